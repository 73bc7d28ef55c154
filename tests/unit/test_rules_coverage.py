"""`rules --check --against`: a rule whose tensor selection matches nothing a job publishes is named."""

from __future__ import annotations

import numpy as np
import pytest

from tensorpulse import wire
from tensorpulse.rules.config import parse_rules
from tensorpulse.rules.coverage import Miss, Published, misses, read_published
from tensorpulse.rules.testing import make_record, make_stats

#: What a hooked nn.Sequential publishes (names as the TorchHook gives them), and its scalars.
SEQUENTIAL = Published(
    tensors=frozenset(
        {
            ("weights", "0.weight"),
            ("biases", "0.bias"),
            ("gradients", "gradient/0.weight"),
            ("gradients", "gradient/0.bias"),
            ("activations", "1/relu_output"),
        }
    ),
    scalars=frozenset({"loss", "lr"}),
)


def _misses(rules: str, published: Published = SEQUENTIAL) -> list[Miss]:
    return misses(parse_rules(f"defaults: false\nrules:\n{rules}", "rules.yaml"), published)


def test_a_regex_that_matches_no_tensor_is_named_with_what_it_could_match() -> None:
    """The README's old BigGradients regex on a Sequential model: a miss, with the gradients it could have used."""
    rules = "  - rule: Threshold\n    name: BigGradients\n    params: {collection_names: [gradients], tensor_regex: 'fc\\d\\.weight', statistic: l2, op: '>', value: 100}\n"
    (miss,) = _misses(rules)
    assert miss == Miss(
        "BigGradients", "tensor_regex", "'fc\\\\d\\\\.weight'", True, ("gradient/0.bias", "gradient/0.weight")
    )
    assert miss.format("j") == (
        "BigGradients: tensor_regex 'fc\\\\d\\\\.weight' matches nothing job 'j' publishes "
        "(it publishes e.g. gradient/0.bias, gradient/0.weight)"
    )
    fixed = rules.replace("fc\\d\\.weight", "\\.weight$")
    assert _misses(fixed) == []


def test_the_regex_is_matched_within_the_selected_collections() -> None:
    """A weight name does not count for a rule that selects gradients."""
    rules = "  - rule: Threshold\n    params: {collection_names: [gradients], tensor_regex: '^0\\.weight$', statistic: l2, op: '>', value: 1}\n"
    assert [m.parameter for m in _misses(rules)] == ["tensor_regex"]
    assert _misses(rules.replace("[gradients]", "[weights]")) == []


def test_an_unknown_collection_is_named() -> None:
    """A collection the job never publishes (a typo) is a miss, listing the collections it has."""
    (miss,) = _misses("  - rule: AllZero\n    params: {collection_names: [gradient]}\n")
    assert (miss.parameter, miss.value, miss.explicit) == ("collection_names", "['gradient']", True)
    assert miss.examples == ("activations", "biases", "gradients", "weights")


@pytest.mark.parametrize(
    "rules",
    [
        "  - rule: ExplodingTensor\n    params: {collection_names: [losses]}\n",  # scalars count as losses
        "  - rule: LossNotDecreasing\n    params: {tensor_regex: '^loss$'}\n",  # a scalar's name
        "  - rule: Threshold\n    params: {scalar: loss, op: '>', value: 10}\n",  # no tensor selection
    ],
)
def test_selections_of_scalars_are_not_misses(rules: str) -> None:
    """Scalars are selected by the collections "losses"/"metrics" and matched by name."""
    assert _misses(rules) == []


def test_a_default_regex_that_matches_nothing_is_not_the_files_doing() -> None:
    """DeadRelu's default regex on a model without ReLUs: a miss, marked as the rule's default."""
    sigmoid = Published(frozenset({("activations", "1/sigmoid_output")}), frozenset({"loss"}))
    (miss,) = misses(parse_rules("defaults: false\nrules:\n  - rule: DeadRelu\n", "r.yaml"), sigmoid)
    assert (miss.rule, miss.explicit) == ("DeadRelu", False)
    assert miss.format("j").endswith("by the rule's default (it publishes e.g. 1/sigmoid_output, loss)")


def test_read_published_folds_records_and_counts_what_does_not_decode() -> None:
    """Names come from every decodable record (announced schemas included); others are counted."""
    block = wire.TensorBlock(
        ["gradient/0.weight"],
        ["gradients"],
        np.array([4]),
        np.array([[0.0, 1.0, -1.0, 1.0, 0.5]], dtype=np.float32),
        np.array([0]),
    )
    first = wire.encode(
        job="j", rank=0, world=1, step=0, mode="train", ts=0.0, scalars={"loss": 1.0}, tensors=block
    )
    later = wire.encode(job="j", rank=0, world=1, step=1, mode="train", ts=0.0, tensors=block, announce=False)
    published, bad = read_published([first, b"not a record", later, None])
    assert bad == 2
    assert published == Published(frozenset({("gradients", "gradient/0.weight")}), frozenset({"loss"}))


def test_published_of_records() -> None:
    """Published.of gathers tensors by collection and scalar names."""
    rec = make_record(0, tensors=[make_stats("gradient/fc1.weight", "gradients", [1.0, -1.0])])
    published = Published.of([rec])
    assert ("gradients", "gradient/fc1.weight") in published.tensors
    assert published.names(["weights"]) == []
