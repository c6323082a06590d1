"""`make bench`: run every benchmark and print its ratio line."""

from tunelab.bench import distill, finetune, mlm

BENCHMARKS = [finetune.main, distill.main, mlm.main]

if __name__ == "__main__":
    for bench in BENCHMARKS:
        bench()
