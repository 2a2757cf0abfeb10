"""Step time of bundles interleaved in one process (A B C A B C ...), so that load drift hits all alike.

    python docs/benchmarks/interleave_steps.py ROUNDS BUNDLE_A BUNDLE_B ...   (ratios are to BUNDLE_A)
"""
import sys, time, json
import numpy as np
from pathlib import Path
from runtime_harness.runner import BundleRunner
from runtime_harness.verify import nonzero_adapter, seeded_batch

bundles = [Path(p) for p in sys.argv[2:]]
rounds = int(sys.argv[1])
runners, stores, batches = [], [], []
for b in bundles:
    r = BundleRunner(b)
    r.load_all()
    a = nonzero_adapter(r.manifest, 0)
    runners.append(r); stores.append(r.initial_state(a)); batches.append(seeded_batch(r.manifest, 0))
for r, s, (ids, labels) in zip(runners, stores, batches):  # warm-up
    r.step(s, ids, labels, 0.0)
times = {str(b.name): [] for b in bundles}
kinds = {str(b.name): {} for b in bundles}  # graph kind -> seconds per round
for k in range(rounds):
    for b, r, s, (ids, labels) in zip(bundles, runners, stores, batches):
        t0 = time.perf_counter(); _, trace = r.step(s, ids, labels, 0.0); times[b.name].append(time.perf_counter() - t0)
        per = {}
        for c in trace.calls:
            kind = r.manifest["graphs"].get(c.graph, {}).get("kind", c.graph)
            per[kind] = per.get(kind, 0.0) + c.seconds
        for kind, sec in per.items():
            kinds[b.name].setdefault(kind, []).append(sec)
        print(b.name, round(times[b.name][-1], 2), flush=True)
med = {k: float(np.median(v)) for k, v in times.items()}
base = med[bundles[0].name]
print(json.dumps({k: {"median_s": v, "vs_first": v / base, "all": times[k],
                      "by_graph_median_s": {g: float(np.median(t)) for g, t in kinds[k].items()}}
                  for k, v in med.items()}, indent=1))
