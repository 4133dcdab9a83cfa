from __future__ import annotations

import pytest

from deltamem import DeltaMemConfig


def test_defaults_are_the_papers():
    c = DeltaMemConfig()
    assert (c.rank, c.alpha, c.branches, c.write_mode, c.output_init, c.online_gain) == (
        8,
        16.0,
        ("q", "o"),
        "TSW",
        "base_slice_fixed",
        0.05,
    )
    assert c.scale == 2.0 and c.num_substates == 1
    assert DeltaMemConfig(write_mode="MSW").num_substates == 4


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"branches": ("q", "x")}, "branches"),
        ({"branches": ()}, "branches"),
        ({"write_mode": "XSW"}, "write_mode"),
        ({"state_update_mode": "weird"}, "state_update_mode"),
        ({"output_init": "random"}, "output_init"),
        ({"rank": 0}, "rank"),
        ({"num_substates": 2}, "num_substates"),
        ({"target_layers": (1, 1)}, "target_layers"),
        ({"scan_backend": "cuda"}, "scan_backend"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"DeltaMemConfig.{field}"):
        DeltaMemConfig(**kwargs)


def test_error_lists_allowed_values():
    with pytest.raises(ValueError, match="TSW, SSW, MSW"):
        DeltaMemConfig(write_mode="bad")


def test_json_round_trip():
    c = DeltaMemConfig(rank=4, branches=("o", "q", "k"), write_mode="msw", num_substates=2, target_layers=(3, 1))
    assert c.write_mode == "MSW" and c.target_layers == (1, 3)
    assert DeltaMemConfig.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="unknown field"):
        DeltaMemConfig.from_dict({"rank": 8, "bogus": 1})


def test_upstream_mapping():
    up = {
        "rank": 8,
        "alpha": 16.0,
        "delta_heads": ["q", "o"],
        "memory_write_granularity": "token",
        "num_state_heads": 4,
        "couple_lambda": True,
        "state_update_mode": "standard",
        "rankwise_gates": True,
        "target_layers": [],
    }
    c = DeltaMemConfig.from_upstream(up)
    assert (c.write_mode, c.num_substates, c.branches, c.target_layers) == ("MSW", 4, ("q", "o"), None)
    assert (
        DeltaMemConfig.from_upstream(
            {**up, "num_state_heads": 1, "memory_write_granularity": "message_mean"}
        ).write_mode
        == "SSW"
    )


def test_new_options_round_trip_and_stay_out_of_default_configs():
    base = DeltaMemConfig().to_dict()
    assert "trainable_delta_scale" not in base and "memory_dtype" not in base  # old adapters' configs unchanged
    c = DeltaMemConfig(
        write_mode="SSW",
        segment_granularity="sentence",
        trainable_delta_scale=True,
        delta_scale_granularity="head",
        delta_o_rmsnorm=True,
        memory_dtype="backbone",
    )
    assert DeltaMemConfig.from_json(c.to_json()) == c
    for kwargs, field in [
        ({"memory_dtype": "fp8"}, "memory_dtype"),
        ({"delta_scale_granularity": "token"}, "delta_scale_granularity"),
        ({"delta_scale_init": 3.0}, "delta_scale_init"),
        ({"write_mode": "SSW", "segment_granularity": "word"}, "segment_granularity"),
    ]:
        with pytest.raises(ValueError, match=f"DeltaMemConfig.{field}"):
            DeltaMemConfig(**kwargs)
