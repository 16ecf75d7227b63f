"""Models built from the user's own code: its errors name the spec and the user's line, and a
model without ``example_inputs`` gets them from a function or, for token models, its embedding."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from autopar.errors import ConfigError, UserCodeError
from autopar.models import attach_example_inputs, parse_model_spec

USER = """
import torch
from torch import nn


def raises():
    raise ValueError("my factory is broken")


def needs(hidden):
    return nn.Linear(hidden, hidden)


def not_a_module():
    return 3


def features():
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))


def batch_of_three():
    return torch.randn(3, 16)


def kwargs_batch():
    return {"x": torch.randn(2, 16), "scale": 2.0}


def a_string():
    return "inputs"


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 50)

    def forward(self, ids):
        return self.out(self.embed(ids))


def tokens():
    return Tokens()
"""


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_zoo.py").write_text(textwrap.dedent(USER))
    (tmp_path / "user_broken.py").write_text("x = 1\ndef model(:\n    pass\n")
    (tmp_path / "user_raises_on_import.py").write_text("import os\nraise OSError('no disk')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("user_zoo", "user_broken", "user_raises_on_import"):
        sys.modules.pop(name, None)


def test_a_factory_that_raises_names_the_spec_and_the_users_line(user_module):
    with pytest.raises(UserCodeError) as info:
        parse_model_spec("user_zoo:raises")
    text = str(info.value)
    assert "model 'user_zoo:raises'" in text and "ValueError: my factory is broken" in text
    assert info.value.location.endswith('in raises: raise ValueError("my factory is broken")')
    assert str(user_module / "user_zoo.py") in info.value.location
    assert info.value.field == "model"


def test_a_factory_that_needs_arguments_is_named(user_module):
    with pytest.raises(UserCodeError, match=r"needs argument\(s\) hidden"):
        parse_model_spec("user_zoo:needs")


def test_a_syntax_error_shows_the_users_line(user_module):
    with pytest.raises(UserCodeError) as info:
        parse_model_spec("user_broken:model")
    assert "SyntaxError" in str(info.value)
    assert info.value.location == f"{user_module / 'user_broken.py'}:2: def model(:"


def test_an_exception_at_import_shows_the_users_line(user_module):
    with pytest.raises(UserCodeError) as info:
        parse_model_spec("user_raises_on_import:model")
    assert "OSError: no disk" in str(info.value)
    assert info.value.location.endswith("<module>: raise OSError('no disk')")


def test_a_factory_returning_no_module_is_a_config_error(user_module):
    with pytest.raises(ConfigError, match="returned int"):
        parse_model_spec("user_zoo:not_a_module")


def test_shapes_torch_cannot_allocate_are_config_errors():
    with pytest.raises(ConfigError) as info:
        parse_model_spec("gpt:layers=2,hidden=99999999744,heads=12")
    assert "overflow" in str(info.value) and "hidden=99999999744" in str(info.value)
    assert not isinstance(info.value, UserCodeError)  # autopar's family, the user's numbers


@pytest.mark.parametrize("spec", [12, None, b"gpt3-175b"])
def test_a_spec_that_is_not_text_is_a_config_error(spec):
    with pytest.raises(ConfigError, match="string"):
        parse_model_spec(spec)


def test_example_inputs_from_a_function_are_resized_and_moved(user_module):
    model = parse_model_spec("user_zoo:features", example_inputs="user_zoo:batch_of_three")
    x = model.example_inputs()
    assert x.shape == (1, 16) and x.device.type == "meta"  # the model was built on meta
    assert model.example_inputs(batch_size=7).shape == (7, 16)
    real = parse_model_spec(
        "user_zoo:features", device="cpu", example_inputs="user_zoo:batch_of_three"
    )
    big = real.example_inputs(batch_size=7)
    torch.testing.assert_close(big[3:6], big[:3])  # the user's rows, repeated along dim 0
    assert real(big).shape == (7, 16)


def test_example_inputs_keep_the_structure_the_function_returns(user_module):
    model = parse_model_spec("user_zoo:features", example_inputs="user_zoo:kwargs_batch")
    batch = model.example_inputs(batch_size=5)
    assert set(batch) == {"x", "scale"} and batch["x"].shape == (5, 16) and batch["scale"] == 2.0


def test_example_inputs_of_the_wrong_kind_are_refused(user_module):
    model = parse_model_spec("user_zoo:features", example_inputs="user_zoo:a_string")
    with pytest.raises(ConfigError, match="returned str") as info:
        model.example_inputs()
    assert info.value.field == "--example-inputs"
    with pytest.raises(ConfigError) as info:
        parse_model_spec("user_zoo:features", example_inputs="user_zoo")
    assert info.value.field == "--example-inputs"


def test_a_token_model_gets_token_ids_from_its_embedding(user_module):
    model = parse_model_spec("user_zoo:tokens", seq_len=12)
    (ids,) = model.example_inputs(batch_size=3)
    assert ids.shape == (3, 12) and not ids.is_floating_point()
    real = parse_model_spec("user_zoo:tokens", seq_len=12, device="cpu")
    (ids,) = real.example_inputs(batch_size=2)
    assert int(ids.max()) < 50 and real(ids).shape == (2, 12, 50)
    # without a length there is nothing to build: the model is left as it is
    assert not hasattr(parse_model_spec("user_zoo:tokens"), "example_inputs")


def test_zoo_models_keep_their_own_example_inputs():
    model = parse_model_spec("gpt:layers=1,hidden=64,heads=4,vocab=128,seq_len=16")
    before = model.example_inputs
    assert attach_example_inputs(model, seq_len=99).example_inputs == before
    assert model.example_inputs()[0].shape == (1, 16)


def test_a_module_without_embedding_or_function_is_left_alone():
    model = nn.Linear(4, 4)
    assert attach_example_inputs(model, seq_len=8) is model
    assert not hasattr(model, "example_inputs")
