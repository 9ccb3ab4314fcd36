"""Fingerprint of the compiled train step of peer.py's default "ours" row, to compare two checkouts.

    python benchmarks/hlo_fingerprint.py                                  # this checkout
    git worktree add /tmp/before 26f1d39
    python benchmarks/hlo_fingerprint.py --root /tmp/before               # the same step at another commit
    git worktree remove --force /tmp/before

Compiles (nothing runs) the step of `benchmarks/peer.py` with its defaults (width 256, 6 layers RRA, 4 heads,
MQA, window 256, vocab 4096, B=4, T=2048, f32, chunked loss, AdamW) with the lmtrain package of `--root`,
and prints the compiled program's temp bytes, XLA's cost analysis, its opcode counts and a hash of its
optimized HLO text with the source metadata (file names, lines, op names) removed. Equal hashes mean XLA
runs the same program, so any difference in step time between the two checkouts is noise. Works with the
flat model config of commit 26f1d39 and earlier and with the sectioned one (`attention.*`, `rglru.*`).
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import re
import sys
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(Path(__file__).resolve().parent.parent),
                   help="checkout whose lmtrain package is compiled (default: this one)")
    p.add_argument("--dump", default="", help="also write the stripped HLO text to this file (to diff two)")
    args = p.parse_args()
    root = str(Path(args.root).resolve())
    sys.path.insert(0, root)

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import lmtrain
    from lmtrain.models import LanguageModel, ModelConfig
    from lmtrain.models.loss import chunked_cross_entropy

    if not lmtrain.__file__.startswith(root):
        raise SystemExit(f"imported lmtrain from {lmtrain.__file__}, not from {root}")
    shape = dict(vocab_size=4096, width=256, num_layers=6, pattern="RRA", mlp_expansion=3, logit_softcap=30.0)
    if hasattr(ModelConfig(), "attention"):  # sectioned config (after commit 26f1d39)
        from lmtrain.configlib import updated

        cfg = updated(ModelConfig(), {**shape, "attention.num_heads": 4, "rglru.num_heads": 4,
                                      "attention.num_kv_heads": 1, "attention.window": 256,
                                      "attention.rope_fraction": 0.5, "attention.rope_base": 10_000.0})
    else:  # the former flat config
        cfg = ModelConfig(**shape, num_heads=4, num_kv_heads=1, window=256, rope_fraction=0.5, rope_base=10_000.0)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LanguageModel(cfg, rngs=nnx.Rngs(0))))

    def loss_fn(state, x, y):  # peer.py's `ours_loss` with loss_chunk=256
        model = nnx.merge(graphdef, state)
        total, _ = chunked_cross_entropy(model.hidden(x)[0], model.embedder.embedding[...], y, jnp.ones(y.shape, bool),
                                         softcap=model.cfg.logit_softcap, chunk=256)
        return total / y.size

    opt = optax.adamw(1e-4, weight_decay=0.1)

    @functools.partial(jax.jit, donate_argnums=(0, 1))  # peer.py's `make_step`
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens[:, :-1], tokens[:, 1:])
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    tokens = jax.ShapeDtypeStruct((4, 2049), jnp.int32)
    compiled = step.lower(state, jax.eval_shape(opt.init, state), tokens).compile()
    lines = [line for line in compiled.as_text().splitlines()  # drop the source-location tables
             if not re.match(r'^(\d+ ["{]|FileNames|FunctionNames|FileLocations|StackFrames)', line)]
    hlo = re.sub(r",?\s*metadata=\{[^}]*\}", "", "\n".join(lines))
    hlo = re.sub(r"^(HloModule \S+).*$", r"\1", hlo, flags=re.M)
    ops = collections.Counter(re.findall(r"= \S+ ([a-z][a-z\-]*)\(", hlo))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(f"lmtrain from {lmtrain.__file__}")
    print(f"temp bytes {compiled.memory_analysis().temp_size_in_bytes}; XLA cost analysis: flops {cost.get('flops')}, "
          f"bytes accessed {cost.get('bytes accessed')}")
    print(f"{sum(ops.values())} HLO instructions: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
    print(f"sha256 of the optimized HLO without metadata: {hashlib.sha256(hlo.encode()).hexdigest()[:16]} "
          f"({len(hlo)} characters)")
    if args.dump:
        Path(args.dump).write_text(hlo)


if __name__ == "__main__":
    main()
