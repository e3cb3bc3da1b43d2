"""Turns a pytest-benchmark JSON file into the markdown tables of benchmarks/README.md.

    python benchmarks/report.py benchmarks/results.json

For every group: the median time of each provider, fastvae's speed-up over it
(provider time / fastvae time), and the bytes per second that provider moved,
with the plain torch.add bandwidth of the same run as the memory-bound yardstick.
"""

import json
import sys
from collections import defaultdict


UNPARAMETRIZED = {
    "test_bandwidth_reference_add": "torch.add",
    "test_latent_forward_eps_given": "fastvae (eps given)",
}


def load(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        provider = bench["params"].get("provider") or UNPARAMETRIZED[bench["name"].split("[")[0]]
        extra = bench["extra_info"]
        groups[bench["group"]][provider] = (bench["stats"]["median"], extra.get("bytes", 0), extra.get("examples", 0))
    return data, groups


def table(groups):
    lines = [
        "| group | provider | median (us) | fastvae speed-up | GB/s or examples/s |",
        "|---|---|---:|---:|---:|",
    ]
    for group in sorted(groups, key=lambda g: (g.split()[0], g)):
        results = groups[group]
        fast = results.get("fastvae", (None,))[0]
        for provider, (median, nbytes, examples) in sorted(results.items(), key=lambda kv: kv[1][0]):
            speedup = f"{median / fast:.2f}x" if fast and not provider.startswith("fastvae") else ""
            rate = f"{nbytes / median / 1e9:.1f} GB/s" if nbytes else f"{examples / median:.0f} ex/s" if examples else ""
            lines.append(f"| {group} | {provider} | {median * 1e6:.1f} | {speedup} | {rate} |")
    return "\n".join(lines)


def main(argv):
    if len(argv) != 2:
        sys.exit("usage: python benchmarks/report.py RESULTS.json")
    data, groups = load(argv[1])
    machine = data.get("machine_info", {})
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} cores; "
          f"date {data.get('datetime', '?')}")
    print(f"{machine.get('fastvae', 'fastvae kernel level not recorded')}\n")
    print(table(groups))


if __name__ == "__main__":
    main(sys.argv)
