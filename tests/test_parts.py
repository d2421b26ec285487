"""Part embeddings (fit --parts): the strips, the combination and loss rules, and a run that uses them end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from whalefast.core.ranking import NEW_WHALE_TARGET
from whalefast.core.spec import IMAGENET_MEAN, IMAGENET_STD
from whalefast.data.prepared import image_cache
from whalefast.learn.trainer import fit
from whalefast.nets.forward import forward_photos
from whalefast.nets.heads import EmbeddingHead, strips
from whalefast.nets.losses import ArcFaceCriterion
from whalefast.runs.folder import Run


def positions(height: int, width: int) -> torch.Tensor:
    """A (1, 1, height, width) feature map whose every value is 100 x its row + its column."""
    return (100 * torch.arange(height)[:, None] + torch.arange(width)[None, :]).float().expand(1, 1, height, width)


def strip_cells(height: int, width: int, parts: int) -> list[list[list[int]]]:
    return [s[0, 0].long().tolist() for s in strips(positions(height, width), parts)]


def test_strips_cut_the_map_left_to_right_then_top_to_bottom_sharing_a_line_where_it_does_not_divide():
    assert strip_cells(2, 4, 2) == [[[0, 1], [100, 101]], [[2, 3], [102, 103]], [[0, 1, 2, 3]], [[100, 101, 102, 103]]]
    # 112x224 input: a 4x7 map, whose halves share column 3
    left, right, top, bottom = strip_cells(4, 7, 2)
    assert left[0] == [0, 1, 2, 3] and right[0] == [3, 4, 5, 6] and len(left) == len(right) == 4
    assert top == [[0, 1, 2, 3, 4, 5, 6], [100, 101, 102, 103, 104, 105, 106]] and bottom[0] == [200, 201, 202, 203, 204, 205, 206]
    assert [cells[0] for cells in strip_cells(1, 7, 3)[:3]] == [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    assert strip_cells(1, 1, 2) == [[[0]]] * 4  # a map too small to cut: every strip is the whole map


def head_with_parts(parts: int = 2) -> EmbeddingHead:
    torch.manual_seed(0)
    head = EmbeddingHead(features=8, embed_dim=4, n_classes=3, margin=0.4, scale=10.0, parts=parts)
    head(torch.rand(6, 8, 3, 7))  # one training step's batch statistics, so the batch-norms are not the identity
    return head.eval()


def test_a_head_with_parts_scores_the_mean_of_the_whole_and_each_strips_cosine():
    head = head_with_parts()
    a, b = torch.rand(1, 8, 3, 7), torch.rand(1, 8, 3, 7)
    cuts = [(..., slice(0, 4)), (..., slice(3, 7)), (..., slice(0, 2), slice(None)), (..., slice(1, 3), slice(None))]  # left, right, top, bottom

    def blocks(x):
        return [F.normalize(head.embed(x), dim=1)] + [F.normalize(embed(x[cut]), dim=1) for embed, cut in zip(head.part_embeds, cuts)]

    with torch.no_grad():
        out_a, out_b = head(a), head(b)
        by_hand = sum(float(u @ v.T) for u, v in zip(blocks(a), blocks(b))) / 5
    assert out_a.shape == (1, 20)
    assert float(out_a.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float(out_a @ out_b.T) == pytest.approx(by_hand, abs=1e-5)


def test_the_loss_is_the_mean_of_each_branchs_arcface_loss_over_catalogued_rows():
    head = head_with_parts()
    with torch.no_grad():
        out = head(torch.rand(5, 8, 3, 7))
    target = torch.tensor([0, 2, NEW_WHALE_TARGET, 1, 2])
    known = target != NEW_WHALE_TARGET
    blocks = [block[known] for block in out.chunk(5, dim=1)]
    losses = [head.arcface, *head.part_arcfaces]
    expected = sum(loss(block, target[known]) for loss, block in zip(losses, blocks)) / 5
    assert float(ArcFaceCriterion(head)(out, target)) == pytest.approx(float(expected), rel=1e-5)
    assert float(expected) > 0


def test_a_head_without_parts_keeps_the_checkpoint_layout_of_earlier_runs():
    head = EmbeddingHead(features=8, embed_dim=4, n_classes=3, margin=0.4, scale=10.0)
    expected = [
        "embed.0.p",
        "embed.1.weight",
        "embed.1.bias",
        "embed.2.weight",
        "embed.2.bias",
        "embed.2.running_mean",
        "embed.2.running_var",
        "embed.2.num_batches_tracked",
        "arcface.W",
    ]
    assert list(head.state_dict()) == expected
    assert list(head_with_parts(1).state_dict())[: len(expected)] == expected


@pytest.mark.slow
def test_a_tiny_fit_with_parts_learns_and_catalogues_the_whole_and_each_strip(tiny_data, tmp_path, tiny_config, baseline_map5):
    cfg = tiny_config(tiny_data, tmp_path, name="parts", method="arcface", augment="fluke", embed_dim=16, scale=16.0, map_every=6, parts=2)
    result = fit(cfg)
    run_dir = tmp_path / "parts"
    assert json.loads((run_dir / "config.json").read_text())["parts"] == 2
    assert result["valid_map5"] > baseline_map5(tiny_data) + 0.05
    run = Run.open(run_dir)
    model = run.network()
    assert run.settings.parts == 2 and len(model[1].part_embeds) == 4
    catalogue = run.catalogue()
    assert catalogue.embeddings.shape[1] == 80  # 16 for the whole photo and for each of its four halves

    names = [p.split("/")[-1] for p in catalogue.photos[:4]]
    images = image_cache(tiny_data, tiny_data / "prepared", "train", names, run.spec)
    by_hand = forward_photos(model, [images[n] for n in names], IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(catalogue.embeddings[:4].float(), F.normalize(by_hand, dim=1), atol=2e-3)  # stored as float16


def test_the_cli_takes_parts_from_the_recipe_or_as_typed_and_refuses_bad_ones(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from whalefast.cli import app
    from whalefast.learn import trainer

    seen = []
    monkeypatch.setattr(trainer, "fit", lambda cfg, resume, distributed, typed: seen.append(cfg))
    assert CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--method", "arcface", "--parts", "3"]).exit_code == 0
    assert CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--recipe", "flukes"]).exit_code == 0
    assert [cfg.parts for cfg in seen] == [3, 2]
    monkeypatch.undo()  # the real fit checks its settings before it reads any data
    for bad in ("-1", "1"):
        result = CliRunner().invoke(app, ["fit", "--data", str(tmp_path), "--method", "arcface", "--parts", bad])
        assert (
            result.exit_code == 1 and f"--parts must be 0 (the whole photo only) or at least 2, got {bad}" in result.output and "Traceback" not in result.output
        )
