"""`make bench`: run every benchmark and print its ratio line."""

from tunelab.bench import finetune

BENCHMARKS = [finetune.main]

if __name__ == "__main__":
    for bench in BENCHMARKS:
        bench()
