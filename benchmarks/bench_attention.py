"""Dense vs block-sparse decode attention (a small grid; `quantpredict attention bench` runs the full one and writes
reports/attention.md). Writes the `attention` section of reports/benchmarks.md."""

from __future__ import annotations

from _common import stamp, write_section

from quantpredict.attention.bench import bench_decode, md_table


def main() -> None:
    df = bench_decode([1024, 4096], [0.1, 1.0], repeats=7)
    table = df[["context", "density", "dense_us", "sparse_us", "speedup"]].round(2)
    write_section("attention", "## Sparse decode attention (one layer, 16 heads x 64, blocks of 64)\n\n"
                  f"{stamp()} Speedup = dense SDPA latency / sparse latency, both measured in this run.\n\n"
                  f"{md_table(table)}\n")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
