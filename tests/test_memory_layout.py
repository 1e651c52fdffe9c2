"""NHWC weights for the faithfulness evaluation: converted for the run, restored after it (also
after an error), recorded per result row, and the same numbers as NCHW up to float rounding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from retina_fgvis import faithfulness as F
from retina_fgvis.memory_layout import (CHANNELS_LAST, CONTIGUOUS, current_layout, model_layout,
                                        resolve_channels_last)

torch.set_num_threads(1)


def _cnn(first_kernel: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, first_kernel, padding=first_kernel // 2), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def test_auto_means_nhwc_on_cpu_only_and_an_explicit_choice_wins():
    assert resolve_channels_last(None, "cpu") is True
    assert resolve_channels_last(None, torch.device("cuda")) is False
    assert resolve_channels_last(False, "cpu") is False
    assert resolve_channels_last(True, "cuda") is True


def test_layout_is_read_past_1x1_kernels_that_are_both_layouts():
    model = _cnn(first_kernel=1)  # a 1x1 kernel is contiguous in both layouts: not evidence
    assert current_layout(model) == CONTIGUOUS
    model.to(memory_format=torch.channels_last)
    assert current_layout(model) == CHANNELS_LAST
    assert current_layout(nn.Linear(2, 2)) == CONTIGUOUS


def test_model_layout_converts_for_the_block_and_restores_even_after_an_error():
    model = _cnn()
    with model_layout(model, channels_last=True) as layout:
        assert layout == CHANNELS_LAST and current_layout(model) == CHANNELS_LAST
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert current_layout(model) == CONTIGUOUS and model[0].weight.is_contiguous()
    with pytest.raises(RuntimeError, match="boom"):
        with model_layout(model, channels_last=True):
            raise RuntimeError("boom")
    assert current_layout(model) == CONTIGUOUS
    # a caller's NHWC model stays NHWC after an NCHW block
    model.to(memory_format=torch.channels_last)
    with model_layout(model, channels_last=False) as layout:
        assert layout == CONTIGUOUS and current_layout(model) == CONTIGUOUS
    assert current_layout(model) == CHANNELS_LAST


def _images(n: int = 2, size: int = 24) -> list[F.EvalImage]:
    rng = np.random.default_rng(1)
    return [F.EvalImage(name=f"i{i}", tensor=torch.from_numpy(rng.normal(size=(3, size, size)).astype(np.float32)))
            for i in range(n)]


def _eval_model() -> F.EvalModel:
    return F.EvalModel(kind="test", model=_cnn(), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=24,
                       class_names=["a", "b", "c"], description="tiny test CNN")


def test_faithfulness_rows_name_their_layout_and_agree_across_layouts():
    em, imgs = _eval_model(), _images()
    methods = ["gradient", "occlusion", "rise"]
    opts = {"rise": {"n_masks": 32}}
    nhwc = F.run_faithfulness(em, imgs, methods, opts, batch_size=2)  # auto on CPU: NHWC
    assert current_layout(em.model) == CONTIGUOUS  # restored after the run
    nchw = F.run_faithfulness(em, imgs, methods, opts, batch_size=2, channels_last=False)
    assert set(nhwc.per_image["memory_format"]) == {CHANNELS_LAST}
    assert set(nchw.per_image["memory_format"]) == {CONTIGUOUS}
    np.testing.assert_allclose(nhwc.per_image["deletion_auc"], nchw.per_image["deletion_auc"], atol=1e-5)
    md = F.faithfulness_markdown(nhwc, "tiny", "2 images")
    assert "6 of 6 (image, method) results ran with channels-last (NHWC) weights" in md
    assert "channels-last" not in F.faithfulness_markdown(nchw, "tiny", "2 images")


def test_records_without_a_layout_read_as_nchw_and_mixed_runs_say_so():
    """Records written before the layout was recorded came from NCHW weights; resuming them with
    an NHWC run gives a table that names both."""
    em, imgs = _eval_model(), _images()
    old = F.run_faithfulness(em, imgs[:1], ["gradient"], channels_last=False)
    legacy = []
    for r in old.per_image.to_dict("records"):
        del r["memory_format"]
        legacy.append(F.MethodRecord(image=r["image"], method=r["method"], row=r,
                                     curve=old.curves["gradient"][0].tolist(), fractions=old.fractions.tolist()))
    run = F.run_faithfulness(em, imgs, ["gradient"], previous=legacy)
    assert list(run.per_image["memory_format"]) == [CONTIGUOUS, CHANNELS_LAST]
    assert "1 of 2 (image, method) results ran with channels-last" in F.faithfulness_markdown(run, "tiny", "2")


def test_model_is_restored_when_a_method_fails():
    em, imgs = _eval_model(), _images(1)
    with pytest.raises(ValueError):
        F.run_faithfulness(em, imgs, ["gradient"], substrate="grey")  # rejected before any work
    with pytest.raises(TypeError):
        F.run_faithfulness(em, imgs, ["rise"], {"rise": {"no_such_option": 1}})  # fails inside the run
    assert current_layout(em.model) == CONTIGUOUS


def test_summary_gives_each_weight_layouts_own_run_time_when_a_run_mixes_them():
    """A resumed run can hold records of both layouts; summary.md's seconds column averages them,
    so the layout line gives each layout's mean (explain + metric) and count per method."""
    import pandas as pd

    from retina_fgvis.faithfulness import _layout_lines

    rows = [("a", "rise", CONTIGUOUS, 300.0, 100.0), ("b", "rise", CHANNELS_LAST, 50.0, 10.0),
            ("c", "rise", CHANNELS_LAST, 70.0, 10.0), ("a", "gradient", CHANNELS_LAST, 1.0, 9.0)]
    df = pd.DataFrame(rows, columns=["image", "method", "memory_format", "seconds_explain", "seconds_metric"])
    line = _layout_lines(df)[-1]
    assert "RISE: contiguous 400.0 s (n = 1), channels_last 70.0 s (n = 2)" in line
    assert "Gradient (saliency): channels_last 10.0 s (n = 1)" in line
    assert len(_layout_lines(df[df["memory_format"] == CHANNELS_LAST])) == 1  # one layout: no split
    assert _layout_lines(df[df["memory_format"] == CONTIGUOUS]) == []
