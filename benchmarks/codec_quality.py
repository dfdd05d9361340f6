"""Does training survive being archived lossily? Ratio, speed and final loss of the lossy codecs.

Run: ``python benchmarks/codec_quality.py`` (CPU, seeded, about a minute on 2 cores).

An MLP classifier (``--width`` 256, two hidden layers, GELU) learns a synthetic task made here: 10
classes given by a random teacher network on 32-dimensional Gaussian inputs (8192 train and 2048
test points). Adam (lr 1e-3), ``--steps`` (500) steps of batches of 128.

* exact run: trained straight through;
* noise run: the same, with another batch order, to show how much two exact runs differ;
* one lossy run per codec setting: every ``steps / 10`` steps the whole state (weights, Adam's
  exp_avg and exp_avg_sq; the step counters stay exact, as any integer-valued scalar should) is
  encoded as a closed-loop link (against the previous *decoded* state; the first link against the
  exact initial weights and no moments), replaced by the decoded state, and training goes on. Ten
  resumes in all, the last one at the final step (so the final loss is measured on decoded state).

For each setting it prints: the ratio of raw float bytes (F32 weights + moments, all ten links) to
the payload bytes, the ratio of ten torch.save files of {model, optimizer} state dicts to the
payload bytes, encode and decode throughput (MB/s of float32 input, over these small tensors), the
final training loss (full train set) and test accuracy, and the loss relative to the exact run.
Then the encode/decode throughput on one ``--big`` (25 M) element tensor per codec (0 skips it).
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
import torch
from torch import nn

from weightslab.storage.lossy import ExcpParams, LcParams, Member, decode, encode_group


def make_data(seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(32, 64, generator=gen) / 32 ** 0.5, torch.randn(64, 10, generator=gen) / 8]
    x = torch.randn(10240, 32, generator=gen)
    logits = torch.tanh(x @ teacher[0]) @ teacher[1] * 4
    # noisy labels (sampled, not argmax): the loss cannot reach 0
    y = torch.multinomial(torch.softmax(logits, 1), 1, generator=gen).squeeze(1)
    return x[:8192], y[:8192], x[8192:], y[8192:]


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 10))


class Archive:
    """A closed-loop chain of lossy links over a model's and its Adam optimizer's float state."""

    def __init__(self, params, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.params, self.model, self.optimizer = params, model, optimizer
        # the chain's anchor: the exact initial weights, no moments yet
        self.previous = {name: p.detach().reshape(-1).numpy().copy() for name, p in model.named_parameters()}
        self.payload_bytes = 0
        self.raw_bytes = 0
        self.encode_seconds = 0.0
        self.decode_seconds = 0.0

    def demote_and_resume(self) -> None:
        """Encode the current state as one link, then continue from what a reader would decode."""
        for name, p in self.model.named_parameters():
            state = self.optimizer.state[p]
            members = [Member(name, "F32", p.detach().reshape(-1).numpy().copy(), self.previous.get(name), "weight")]
            for key, role in (("exp_avg", "moment"), ("exp_avg_sq", "second_moment")):
                members.append(Member(f"{name}.{key}", "F32", state[key].reshape(-1).numpy().copy(),
                                      self.previous.get(f"{name}.{key}"), role))
            start = time.perf_counter()
            encoded = encode_group(self.params, members)
            self.encode_seconds += time.perf_counter() - start
            start = time.perf_counter()
            decoded = [decode(e.payload, m.base, dtype="F32", size=m.target.size) for e, m in zip(encoded, members)]
            self.decode_seconds += time.perf_counter() - start
            for member, enc, dec in zip(members, encoded, decoded):
                assert dec.tobytes() == enc.decoded.tobytes()
                self.payload_bytes += len(enc.payload)
                self.raw_bytes += member.target.nbytes
                self.previous[member.key] = dec
            with torch.no_grad():
                p.copy_(torch.from_numpy(decoded[0]).reshape(p.shape))
                state["exp_avg"].copy_(torch.from_numpy(decoded[1]).reshape(p.shape))
                state["exp_avg_sq"].copy_(torch.from_numpy(decoded[2]).reshape(p.shape))


def train(args, data, *, params=None, order_seed: int = 1) -> dict:
    x, y, x_test, y_test = data
    model = make_model(args.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    archive = Archive(params, model, optimizer) if params is not None else None
    gen = torch.Generator().manual_seed(order_seed)
    every = args.steps // 10
    save_bytes = 0
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, x.shape[0], (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0:
            if archive is not None:
                archive.demote_and_resume()
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
            save_bytes += buffer.tell()
    with torch.no_grad():
        final = nn.functional.cross_entropy(model(x), y).item()
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    result = {"loss": final, "accuracy": accuracy, "save_bytes": save_bytes}
    if archive is not None:
        mb = archive.raw_bytes / 1e6
        result.update(raw_ratio=archive.raw_bytes / archive.payload_bytes, save_ratio=save_bytes / archive.payload_bytes,
                      encode=mb / archive.encode_seconds, decode=mb / archive.decode_seconds)
    return result


def throughput(params, n: int) -> tuple[float, float, float]:
    """(encode MB/s, decode MB/s, ratio) of one weight of ``n`` float32 elements and a 1e-3 update."""
    gen = np.random.default_rng(0)
    base = gen.standard_normal(n, dtype=np.float32) * 0.02
    target = base + gen.standard_normal(n, dtype=np.float32) * 2e-5
    start = time.perf_counter()
    (encoded,) = encode_group(params, [Member("w", "F32", target, base, "weight")])
    middle = time.perf_counter()
    decode(encoded.payload, base, dtype="F32", size=n)
    end = time.perf_counter()
    return n * 4 / 1e6 / (middle - start), n * 4 / 1e6 / (end - middle), n * 4 / len(encoded.payload)


SETTINGS = [
    ("lc bits=2", LcParams(bits=2)),
    ("lc bits=3", LcParams(bits=3)),
    ("lc bits=4", LcParams(bits=4)),
    ("lc bits=6", LcParams(bits=6)),
    ("lc bits=4, moment_bits=2", LcParams(bits=4, moment_bits=2)),
    ("lc bits=4, moment_bits=1", LcParams(bits=4, moment_bits=1)),
    ("lc bits=3, moment_bits=2", LcParams(bits=3, moment_bits=2)),
    ("excp default (weight_prune=0.5, moment_prune=1)", ExcpParams()),
    ("excp weight_prune=0.5, moment_prune=0.5", ExcpParams(weight_prune=0.5, moment_prune=0.5)),
    ("excp weight_prune=1", ExcpParams(weight_prune=1.0)),
    ("excp weight_prune=2", ExcpParams(weight_prune=2.0)),
    ("excp weight_prune=3, moment_prune=1", ExcpParams(weight_prune=3.0, moment_prune=1.0)),
    ("excp bits=3", ExcpParams(bits=3)),
    ("excp bits=2", ExcpParams(bits=2)),
    ("excp moment_bits=2", ExcpParams(moment_bits=2)),
    ("excp weight_prune=1, moment_bits=2", ExcpParams(weight_prune=1.0, moment_bits=2)),
    ("excp prune_second_moment", ExcpParams(prune_second_moment=True)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--big", type=int, default=25_000_000, help="elements of the throughput tensor (0: skip)")
    parser.add_argument("--only", default="", help="run only the settings whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = make_data(1234)
    exact = train(args, data)
    noise = train(args, data, order_seed=2)
    print(f"{'setting':48} {'raw/x':>7} {'save/x':>7} {'enc MB/s':>9} {'dec MB/s':>9} {'loss':>7} {'acc':>6} "
          f"{'loss/exact':>10}")
    print(f"{'exact':48} {'':>7} {'':>7} {'':>9} {'':>9} {exact['loss']:7.4f} {exact['accuracy']:6.3f} {1:10.4f}")
    print(f"{'exact, other batch order (noise)':48} {'':>7} {'':>7} {'':>9} {'':>9} {noise['loss']:7.4f} "
          f"{noise['accuracy']:6.3f} {noise['loss'] / exact['loss']:10.4f}")
    for name, params in SETTINGS:
        if args.only and args.only not in name:
            continue
        r = train(args, data, params=params)
        print(f"{name:48} {r['raw_ratio']:7.1f} {r['save_ratio']:7.1f} {r['encode']:9.0f} {r['decode']:9.0f} "
              f"{r['loss']:7.4f} {r['accuracy']:6.3f} {r['loss'] / exact['loss']:10.4f}", flush=True)
    if args.big:
        print(f"\nthroughput on one {args.big:,}-element float32 weight, 1e-3 relative update:")
        for name, params in (("lc default", LcParams()), ("excp default", ExcpParams())):
            enc, dec, ratio = throughput(params, args.big)
            print(f"  {name:14} encode {enc:6.0f} MB/s  decode {dec:6.0f} MB/s  ratio {ratio:5.1f}x")


if __name__ == "__main__":
    main()
