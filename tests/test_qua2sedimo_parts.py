"""Qua²SeDiMo building blocks against float64 references and known answers: 1-D k-means, the
Lp-clipped UAQ, the codebook layer (decode, packing, bytes, A8), the layer graph, sampling, the GNN
and its ranking loss, and the budgeted construction."""
from __future__ import annotations

import itertools

import pytest
import torch

from ditq.kernels import reference
from ditq.quant_core.methods.qua2sedimo import gnn
from ditq.quant_core.methods.qua2sedimo import config_search as qs
from ditq.quant_core.layers import CodebookLinear
from ditq.quant_core.methods.qua2sedimo.options import Option, build_option, kmeans_1d, option_grid, uaq_quantize
from ditq.quant_core.quantizers import dequantize, packed_width


def test_kmeans_1d_recovers_separated_clusters_and_is_a_lloyd_fixed_point():
    gen = torch.Generator().manual_seed(0)
    means = torch.tensor([-5.0, -1.0, 2.0, 7.0])
    x = (means.repeat_interleave(50) + 0.1 * torch.randn(200, generator=gen))[torch.randperm(200, generator=gen)]
    cent, assign = kmeans_1d(x[None], 4)
    truth = torch.stack([x[(x - m).abs() < 1].double().mean() for m in means])
    assert torch.allclose(cent[0].double(), truth, atol=1e-5)
    # On noisy data: every centroid is the mean of its points and every point sits at its nearest centroid.
    y = torch.randn(3, 300, generator=gen)
    cent, assign = kmeans_1d(y, 8)
    nearest = (y.double()[..., None] - cent.double()[:, None, :]).abs().argmin(-1)
    assert torch.equal(assign, nearest)
    for r in range(3):
        for c in range(8):
            pts = y[r][assign[r] == c].double()
            if pts.numel():
                assert abs(pts.mean().item() - cent[r, c].item()) < 1e-5


def test_uaq_picks_the_lp_optimal_clipping_per_row():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=gen)
    q, scale, zero = uaq_quantize(w, 3)
    chosen = (dequantize(q, scale, zero).double() - w.double()).abs().pow(2.4).sum(1)
    errs = []
    for i in range(10):  # float64 brute force over the ten shrink factors
        f = 1 - 0.1 * i
        lo, hi = w.double().amin(1, keepdim=True).clamp(max=0) * f, w.double().amax(1, keepdim=True).clamp(min=0) * f
        s = ((hi - lo) / 7).clamp_min(1e-8)
        z = (-torch.round(lo / s)).clamp(0, 7)
        errs.append(((torch.clamp(torch.round(w.double() / s) + z, 0, 7) - z) * s - w.double()).abs().pow(2.4).sum(1))
    best = torch.stack(errs).amin(0)
    assert torch.allclose(chosen, best, rtol=1e-4)
    assert (chosen <= errs[0] * (1 + 1e-6)).all() and (chosen < errs[0] * 0.95).any()  # clipping pays off
    assert int(q.max()) <= 7 and q.dtype == torch.uint8


@pytest.mark.parametrize("per_channel,dim,bits", [(True, 1, 3), (False, 1, 3), (False, 2, 4), (True, 1, 8)])
def test_codebook_linear_matches_float64_reference(per_channel, dim, bits):
    gen = torch.Generator().manual_seed(2)
    n, k = 6, 20  # 20 / dim index columns: not a multiple of 8, so packing pads
    lin = torch.nn.Linear(k, n)
    rows = n if per_channel else 1
    book = torch.randn(rows, 2**bits, dim, generator=gen).half()
    idx = torch.randint(0, 2**bits, (n, k // dim), generator=gen)
    mod = CodebookLinear.from_assignment(lin, idx, book, bits)
    w_ref = torch.stack([book[r if per_channel else 0].double()[idx[r]].reshape(k) for r in range(n)])
    assert torch.equal(mod.effective_weight().double(), w_ref)
    x = torch.randn(5, k, generator=gen)
    y_ref = x.double() @ w_ref.t() + lin.bias.double()
    assert torch.allclose(mod(x).double(), y_ref, atol=1e-5)
    want = n * packed_width(k // dim, bits) + rows * 2**bits * dim * 2
    assert mod.weight_nbytes() == want
    twin = CodebookLinear.from_spec(mod.spec())
    twin.load_state_dict(mod.state_dict(), assign=True)
    assert torch.equal(twin(x), mod(x))


def test_codebook_linear_a8_quantizes_activations_per_token():
    lin = torch.nn.Linear(16, 4)
    mod = build_option(lin, Option("kma", 3), act_bits=8)
    x = torch.randn(3, 16) * torch.tensor([1.0, 10.0, 100.0])[:, None]
    xq, sx = reference.act_quant(x, 8)
    y_ref = (xq.double() * sx.double()) @ mod.effective_weight().double().t() + lin.bias.double()
    assert torch.allclose(mod(x).double(), y_ref, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(mod(x), x @ mod.effective_weight().t() + lin.bias, atol=1e-6)


def test_options_error_falls_with_bits_and_sizes_are_honest():
    torch.manual_seed(3)
    lin = torch.nn.Linear(256, 64)
    n, k = 64, 256
    for opt in option_grid((2, 3, 4)):
        mod = build_option(lin, opt)
        # UAQ: a float32 scale and an int8 zero point per row; k-means: fp16 codebooks
        overhead = {"uaq": n * (4 + 1), "kmc": n * 2**opt.bits * 2, "kma": 2**opt.bits * 2}[opt.method]
        assert mod.weight_nbytes() == n * packed_width(k, opt.bits) + overhead, opt
    for method in ("uaq", "kmc", "kma"):
        errs = [((build_option(lin, Option(method, b)).effective_weight() - lin.weight) ** 2).sum().item()
                for b in (2, 3, 4)]
        assert errs[0] > errs[1] > errs[2], method


def test_layer_graph_follows_pixart_data_flow(tiny_pipe):
    from ditq.quant_core.models import select_layers
    from ditq.quant_core.methods.qua2sedimo.graph import build_graph
    from ditq import QuantConfig

    layers = select_layers(tiny_pipe.transformer, QuantConfig(method="rtn", act_bits=None, include=[".*"]))
    g = build_graph(layers)
    idx = g.index()
    b = "transformer_blocks."
    assert g.adj[idx[b + "1.attn1.to_q"], idx[b + "0.ff.net.2"]]
    assert g.adj[idx[b + "1.attn1.to_q"], idx["adaln_single.linear"]]
    assert g.adj[idx[b + "0.attn2.to_k"], idx["caption_projection.linear_2"]]
    assert g.adj[idx[b + "0.attn2.to_q"], idx[b + "0.attn1.to_out.0"]]
    assert g.adj[idx["proj_out"], idx[b + "3.ff.net.2"]]
    assert not g.adj[idx[b + "0.attn1.to_q"], idx[b + "0.attn1.to_k"]]
    names = sorted(s.name for s in g.subgraphs)
    assert names == sorted([f"B{i}-{k}" for i in range(4) for k in ("SA", "CA", "FFN")] + ["T-Emb", "Caption", "ProjOut"])
    hops = {s.name: s.hop for s in g.subgraphs}
    assert hops["B0-SA"] == 1 and hops["T-Emb"] == 2 and hops["ProjOut"] == 1


def test_graph_splits_mmdit_joint_attention_by_stream():
    """Flux's double block: the image stream's q/k/v/out and the text stream's add_q/k/v/to_add_out are
    two subgraphs of 4 (one of 8 would need options^8 scored assignments); both outputs read all six
    projections (joint attention)."""
    from ditq.evaluation.architectures import tiny_transformer
    from ditq.quant_core.methods.qua2sedimo.graph import build_graph
    from ditq.quant_core.models import select_layers

    g = build_graph(select_layers(tiny_transformer("flux")))
    idx, subs = g.index(), {s.name: [g.names[i] for i in s.nodes] for s in g.subgraphs}
    a = "transformer_blocks.0.attn."
    assert sorted(subs["B0-SA"]) == sorted(a + n for n in ("to_q", "to_k", "to_v", "to_out.0"))
    assert sorted(subs["B0-SA-ctx"]) == sorted(a + n for n in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"))
    assert g.adj[idx[a + "to_add_out"], idx[a + "to_q"]] and g.adj[idx[a + "to_out.0"], idx[a + "add_k_proj"]]
    assert max(len(n) for n in subs.values()) == 4


def test_sampling_is_deterministic_and_spans_bit_mixes():
    layers = [f"l{i}" for i in range(40)]
    opts = [o.name for o in option_grid((3, 4))]
    a = [qs.sample_assignment(layers, opts, i, seed=0) for i in range(30)]
    assert a[5] == qs.sample_assignment(layers, opts, 5, seed=0)
    assert a[5] != qs.sample_assignment(layers, opts, 5, seed=1)
    low = [sum(v.endswith("3") for v in x.values()) / 40 for x in a]
    assert min(low) < 0.25 and max(low) > 0.75  # p ~ U(0, 1) covers mostly-4-bit to mostly-3-bit
    methods = {v[:-1] for x in a for v in x.values()}
    assert methods == {"uaq", "kmc", "kma"}


def test_label_store_resumes_and_refuses_other_settings(tmp_path):
    path = tmp_path / "labels.json"
    store = qs.LabelStore(path, "abc")
    store.add(3, {"quality": 1.5})
    again = qs.LabelStore(path, "abc")
    assert again.records == {3: {"quality": 1.5}}
    with pytest.raises(ValueError, match="fingerprint"):
        qs.LabelStore(path, "other")


def test_gatv2_layer_matches_explicit_float64_loop():
    torch.manual_seed(4)
    layer = gnn.GATv2Layer(5, 3).double()
    h = torch.randn(2, 4, 5, dtype=torch.float64)
    adj = gnn.with_self_loops(torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]]))
    out = layer(h, adj)
    for bi in range(2):
        for i in range(4):
            js = [j for j in range(4) if adj[i, j]]
            e = torch.stack([layer.att @ torch.nn.functional.leaky_relu(
                layer.dst.weight @ h[bi, i] + layer.src.weight @ h[bi, j] + layer.src.bias, 0.2) for j in js])
            alpha = torch.softmax(e, 0)
            ref = sum(a * (layer.src.weight @ h[bi, j] + layer.src.bias) for a, j in zip(alpha, js))
            assert torch.allclose(out[bi, i], ref, atol=1e-10)


def test_spearman_and_ranking_loss():
    a = torch.tensor([1.0, 2.0, 2.0, 5.0])
    assert gnn.spearman(a, torch.tensor([10.0, 20.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert gnn.spearman(a, -a) == pytest.approx(-1.0)
    y = torch.arange(20.0)
    assert gnn.ranking_loss(y * 3, y, temperature=0.01).item() < 1e-3
    assert gnn.ranking_loss(-y, y, temperature=0.01).item() > 1.99


def test_ranking_term_is_part_of_the_objective():
    torch.manual_seed(5)
    model = gnn.GraphRegressor(3, 8, 2)
    x, adj, y = torch.randn(10, 4, 3), gnn.with_self_loops(torch.zeros(4, 4)), torch.randn(10)
    pred, hops = model(x, adj)
    rank = torch.stack([gnn.ranking_loss(pred, y)] + [gnn.ranking_loss(h.abs().sum(-1), y) for h in hops]).mean()
    with torch.no_grad():
        diff = gnn.objective(model, x, adj, y, 1.0) - gnn.objective(model, x, adj, y, 0.0)
    assert diff.item() == pytest.approx(rank.item(), rel=1e-5) and diff.item() > 0


@pytest.fixture
def one_thread():
    """Small models train faster on one thread, and much faster on a shared, loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_predictor_learns_a_graph_target(one_thread):
    """Target = node feature 0 weighted by a per-node sensitivity: the ensemble ranks held-out graphs."""
    gen = torch.Generator().manual_seed(6)
    n = 4
    adj = torch.zeros(n, n, dtype=torch.bool)
    for i in range(1, n):
        adj[i, i - 1] = True
    sens = torch.tensor([0.2, 0.5, 1.0, 2.0])
    x = torch.cat([torch.rand(120, n, 1, generator=gen), torch.eye(n).expand(120, n, n)], -1)
    y = -(x[..., 0] * sens).sum(-1)
    ens = qs.train_ensemble(x[:80], adj, y[:80], folds=2, epochs=60, hidden=16, layers=2, batch_size=20,
                            lr=3e-3, progress=False)
    assert qs.evaluate_holdout(ens, x[80:], adj, y[80:]) > 0.8


def _scored(costs_scores):
    from ditq.quant_core.methods.qua2sedimo.graph import Subgraph

    out = []
    for k, (nbytes, scores) in enumerate(costs_scores):
        sg = Subgraph(f"s{k}", "SA", 0, [k], 1)
        out.append(qs.SubgraphScores(sg, [(f"o{j}",) for j in range(len(scores))], torch.tensor(scores),
                                     torch.tensor(nbytes, dtype=torch.float64)))
    return out


class _Bank:
    def __init__(self, n):
        self.numel = {f"l{i}": 8 for i in range(n)}


class _Graph:
    def __init__(self, n):
        self.names = [f"l{i}" for i in range(n)]


def test_construction_respects_the_budget_and_matches_brute_force():
    gen = torch.Generator().manual_seed(7)
    n = 5
    items = [(sorted(torch.randint(2, 9, (4,), generator=gen).tolist()),
              sorted(torch.randn(4, generator=gen).tolist())) for _ in range(n)]
    scored = _scored(items)
    for target in (3.0, 4.5, 6.0, 9.0):
        a = qs.construct(_Graph(n), _Bank(n), scored, target)
        choice = [int(a[f"l{k}"][1:]) for k in range(n)]
        spent = sum(items[k][0][c] for k, c in enumerate(choice))
        budget = target * 8 * n / 8
        assert spent <= budget
        best = max(sum(items[k][1][c] for k, c in enumerate(cs)) for cs in itertools.product(range(4), repeat=n)
                   if sum(items[k][0][c] for k, c in enumerate(cs)) <= budget)
        got = sum(items[k][1][c] for k, c in enumerate(choice))
        assert got >= best - 0.35 * abs(best) - 1e-9  # Lagrangian + greedy: near the exact optimum
    top = qs.construct(_Graph(n), _Bank(n), scored, 100.0)
    assert all(top[f"l{k}"] == "o3" for k in range(n))  # unconstrained: best of every subgraph
    with pytest.raises(ValueError, match="below the smallest"):
        qs.construct(_Graph(n), _Bank(n), scored, 0.1)
