"""The denoiser as a layer graph for Qua²SeDiMo's predictor and subgraph scoring (methods.md §5.3).

Nodes are the quantized weight layers; directed edges follow the data flow: a block's self-attention
inputs (q/k/v) read the residual stream and the adaLN modulation, attention outputs read q/k/v,
cross-attention keys/values read the caption embedder, the FFN reads the stream, and the stream flows
into the next block and finally into the output projection. Subgraphs are the units the paper scores:
per block self-attention, cross-attention and FFN (an MMDiT's joint attention as two: the image
stream's and the text stream's projections), plus the timestep embedder (with adaLN), the caption
embedder and the output projection.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ...models import LayerInfo

# (regex over the module name, op type); first match wins. Block op types are prefixed by the role.
_OP_PATTERNS = (
    (r"(timestep_embedder|t_embedder|time_embed|time_proj)", "T-Emb"),
    (r"(adaln|adaLN|ada_norm|norm1\.linear|norm1\.emb|modulation)", "AdaLN"),
    (r"(caption_projection|y_embedder|context_embedder|text_embed)", "Caption"),
    (r"(^proj_out$|final_layer|norm_out\.linear)", "ProjOut"),  # not Flux's in-block proj_out
    (r"(to_q|q_linear|q_proj)$", "Q"),
    (r"(to_k|k_proj)$", "K"),
    (r"(to_v|v_proj)$", "V"),
    (r"kv_linear$", "KV"),
    (r"qkv$", "QKV"),
    (r"(to_out\.0|to_add_out|out_proj|attn\.proj|cross_attn\.proj)$", "O"),
    (r"(ff\.net\.0\.proj|fc1|mlp\.0|ff\.net\.0)$", "FC1"),
    (r"(ff\.net\.2|fc2|mlp\.2)$", "FC2"),
)
# MMDiT joint attention (Flux, SD3): the text stream's own q/k/v/out weights. They form a subgraph
# of their own beside the image stream's: one subgraph of all 8 would have options^8 assignments to score.
_CONTEXT_STREAM = re.compile(r"\.(add_[qkv]_proj|to_add_out)$")
_ROLE_PREFIX = {"self_attn": "SA", "temporal_attn": "SA", "joint_attn": "SA", "cross_attn": "CA", "ffn": "FFN"}
OP_TYPES = ("T-Emb", "AdaLN", "Caption", "ProjOut", "SA-Q", "SA-K", "SA-V", "SA-KV", "SA-QKV", "SA-O",
            "CA-Q", "CA-K", "CA-V", "CA-KV", "CA-QKV", "CA-O", "FFN-FC1", "FFN-FC2", "Other")


def op_type(info: LayerInfo) -> str:
    """``SA-Q``, ``CA-O``, ``FFN-FC1``, ``T-Emb``, ... for a selected layer."""
    for pattern, kind in _OP_PATTERNS:
        if re.search(pattern, info.name):
            if kind in ("T-Emb", "AdaLN", "Caption", "ProjOut"):
                return kind
            prefix = _ROLE_PREFIX.get(info.role)
            return f"{prefix}-{kind}" if prefix and f"{prefix}-{kind}" in OP_TYPES else "Other"
    return "Other"


@dataclass
class Subgraph:
    name: str          # e.g. "B2-SA", "T-Emb"
    kind: str          # "SA", "CA", "FFN", "T-Emb", "Caption", "ProjOut", "AdaLN", "Other"
    block: int
    nodes: list[int]   # indices into LayerGraph.names
    hop: int           # hop level whose embedding scores it: longest path inside it, at least 1


@dataclass
class LayerGraph:
    names: list[str]
    op_types: list[str]
    blocks: list[int]
    adj: torch.Tensor            # bool [n, n], adj[i, j]: i receives from j
    subgraphs: list[Subgraph]
    num_blocks: int

    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}


def _longest_path(adj: torch.Tensor) -> int:
    """Longest directed path (edges) in a small DAG given as ``adj[i, j]``: j -> i."""
    n = adj.shape[0]
    depth = [0] * n
    for _ in range(n):
        for i in range(n):
            for j in range(n):
                if adj[i, j] and i != j:
                    depth[i] = max(depth[i], depth[j] + 1)
    return max(depth, default=0)


def build_graph(layers: dict[str, LayerInfo]) -> LayerGraph:
    names = list(layers)
    types = [op_type(layers[n]) for n in names]
    blocks = [layers[n].block for n in names]
    num_blocks = max(blocks) + 1 if max(blocks) >= 0 else 0
    n = len(names)
    adj = torch.zeros(n, n, dtype=torch.bool)

    def link(dsts, srcs):
        for d in dsts:
            for s in srcs:
                if d != s:
                    adj[d, s] = True

    of = lambda kind, block=-1: [i for i in range(n) if types[i] == kind and blocks[i] == block]  # noqa: E731
    chain = lambda ids: [link([b], [a]) for a, b in zip(ids, ids[1:])]  # noqa: E731
    temb, caption = of("T-Emb"), of("Caption")
    chain(temb)
    chain(caption)
    global_ada = of("AdaLN")
    link(global_ada, temb[-1:])
    time_src = global_ada or temb[-1:]
    stream: list[int] = []
    for b in range(num_blocks):
        ada = of("AdaLN", b)
        link(ada, time_src)
        mod = ada or time_src
        sa_in = [i for t in ("SA-Q", "SA-K", "SA-V", "SA-KV", "SA-QKV") for i in of(t, b)]
        link(sa_in, stream + mod)
        link(of("SA-O", b), sa_in)
        stream = of("SA-O", b) or stream
        ca_q, ca_kv = of("CA-Q", b), [i for t in ("CA-K", "CA-V", "CA-KV") for i in of(t, b)]
        link(ca_q, stream)
        link(ca_kv, caption[-1:])
        link(of("CA-O", b), ca_q + ca_kv)
        stream = of("CA-O", b) or stream
        link(of("FFN-FC1", b), stream + mod)
        link(of("FFN-FC2", b), of("FFN-FC1", b))
        stream = of("FFN-FC2", b) or stream
        for i in of("Other", b):  # unknown block Linears: keep them on the stream, in module order
            link([i], stream)
            stream = [i]
    link(of("ProjOut"), stream + time_src)
    return LayerGraph(names, types, blocks, adj, _subgraphs(names, types, blocks, num_blocks, adj), num_blocks)


def _subgraphs(names, types, blocks, num_blocks, adj) -> list[Subgraph]:
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (t, b) in enumerate(zip(types, blocks)):
        kind = t.split("-")[0] if b >= 0 and t not in ("AdaLN", "Other") else t
        if kind == "AdaLN" and b < 0:
            kind = "T-Emb"  # the global adaLN projection belongs to the time embedding
        if kind == "Other":
            groups[(f"Other:{names[i]}", b)] = [i]
            continue
        if kind == "SA" and _CONTEXT_STREAM.search(names[i]):
            kind = "SA-ctx"
        groups.setdefault((kind, b), []).append(i)
    out = []
    for (kind, b), nodes in groups.items():
        sub = adj[nodes][:, nodes]
        label = f"B{b}-{kind}" if b >= 0 else kind
        out.append(Subgraph(label, kind.split(":")[0], b, nodes, max(1, _longest_path(sub))))
    return out
