"""Qua²SeDiMo end to end on the built-in PixArt (a reduced search: one block plus the embedders and the
output projection, few labels, few epochs): options cached and resumable, the searched configuration
hits its bit budget honestly, quantizes for real, saves and loads, and the insight files exist."""
from __future__ import annotations

import json

import pytest
import torch

from ditq import QuantConfig, load_quantized, quantize, save_quantized
from ditq.quant_core.serialization import read_safetensors

SMALL = dict(num_configs=12, folds=2, epochs=8, label_steps=2, label_prompts=["a red fox in snow"],
             hidden=16, gnn_layers=2, refine_rounds=1, target_bits=3.5)


@pytest.fixture(scope="module")
def searched(tiny_pipe, tmp_path_factory):
    from ditq.quant_core.methods.qua2sedimo.method import search

    cfg = QuantConfig.preset("qua2sedimo-w3.5")
    cfg.include = [r"transformer_blocks\.0\.", r"^proj_out$", r"^caption_projection\."]
    cfg.options.update(SMALL)
    work = tmp_path_factory.mktemp("q2s")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the small GNN trains far faster on one thread of a shared machine
    try:
        return cfg, search(tiny_pipe, cfg, workdir=work, progress=False), work
    finally:
        torch.set_num_threads(before)


def test_search_hits_budget_and_writes_insights(searched):
    cfg, result, work = searched
    assert len(result.assignment) == 13
    assert 3.2 < result.avg_bits <= 3.5
    for name in ("scores_by_subgraph.png", "scores_by_optype.png", "choices_by_optype.png"):
        from PIL import Image

        assert Image.open(work / name).size[0] >= 480
    table = (work / "insights.md").read_text()
    assert "B0-SA" in table and "K-Means-A 3b" in table
    labels = json.loads((work / "labels.json").read_text())["records"]
    assert len(labels) == 12 and all(abs(r["bits"] - result.bank.bits(r["assignment"])) < 1e-9 for r in labels.values())
    # every configuration gets its own measured label
    assert len({round(r["quality"], 6) for r in labels.values()}) == 12


def test_resume_reuses_labels_and_options(searched):
    from ditq.quant_core.methods.qua2sedimo import config_search as qs
    from ditq.quant_core.methods.qua2sedimo.options import OptionBank

    cfg, result, work = searched
    bank = OptionBank.load(work / "options.safetensors")
    assert bank.layers == result.bank.layers and bank.options == result.bank.options
    for name in bank.layers:
        for opt in bank.options:
            a, b = bank.entries[name][opt], result.bank.entries[name][opt]
            assert (a.error, a.nbytes) == (b.error, b.nbytes)
            assert torch.equal(a.module.effective_weight(), b.module.effective_weight())
    fingerprint = json.loads((work / "labels.json").read_text())["fingerprint"]
    store = qs.LabelStore(work / "labels.json", fingerprint)

    def never(*_):
        raise AssertionError("a stored label was recomputed")

    assert qs.label_configs(bank, never, store, range(12), progress=False) == result.labels


def test_workdir_of_other_weights_is_refused(searched, tiny_pipe, fresh):
    """A workdir resumed for a fine-tune of the same architecture would label and search with the
    other model's quantized options: refused, naming the bank."""
    from ditq.quant_core.methods.qua2sedimo.method import search

    cfg, _, work = searched
    pipe = fresh(tiny_pipe)
    with torch.no_grad():
        pipe.transformer.transformer_blocks[0].attn1.to_q.weight.mul_(1.01)
    with pytest.raises(ValueError, match=r"options\.safetensors holds options built from other weights"):
        search(pipe, cfg, workdir=work, progress=False)


def test_quantized_model_holds_the_counted_bits_and_round_trips(searched, tiny_pipe, fresh, tmp_path, run_pipe):
    cfg, result, _ = searched
    pipe = fresh(tiny_pipe)
    report = quantize(pipe.transformer, result.config, progress=False)
    numel = sum(r.fp16_bytes for r in report.layers) // 2
    assert 8 * report.quant_bytes / numel == pytest.approx(result.avg_bits, abs=1e-9)
    assert pipe.transformer.ditq_state["method_state"]["avg_bits"] == pytest.approx(result.avg_bits)
    # the stored file holds exactly those bytes for the quantized weights (indices, codebooks, scales)
    path = save_quantized(pipe.transformer, tmp_path / "q2s.safetensors")
    tensors, _ = read_safetensors(path)
    stored = sum(t.numel() * t.element_size() for k, t in tensors.items()
                 if k.rsplit(".", 1)[0] in result.assignment and not k.endswith(".bias"))
    assert stored == report.quant_bytes
    for name, opt in result.assignment.items():  # no full-precision weight left in a quantized layer
        assert f"{name}.weight" not in tensors or tensors[f"{name}.weight"].dtype in (torch.uint8, torch.int8)
    loaded = load_quantized(path)
    x = torch.randn(2, 4, 16, 16)
    kw = dict(encoder_hidden_states=torch.randn(2, 8, 64), timestep=torch.tensor([10, 500]),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    with torch.no_grad():
        assert torch.equal(loaded(x, **kw).sample, pipe.transformer(x, **kw).sample)
    kinds = {m.layer_type for m in loaded.modules() if hasattr(m, "layer_type")}
    assert kinds <= {"linear", "codebook"} and len(kinds) >= 1


def test_method_needs_an_assignment(tiny_pipe, fresh):
    cfg = QuantConfig.preset("qua2sedimo-w3.5")
    with pytest.raises(ValueError, match="search"):
        quantize(fresh(tiny_pipe).transformer, cfg, progress=False)
    cfg.options["assignment"] = {"proj_out": "kma3"}
    with pytest.raises(ValueError, match="missing"):
        quantize(fresh(tiny_pipe).transformer, cfg, progress=False)
