"""`make bench`: run every benchmark and print its ratio line."""

from tunelab.bench import compress, distill, finetune, mlm, serve

BENCHMARKS = [finetune.main, distill.main, mlm.main, serve.main, compress.main]

if __name__ == "__main__":
    for bench in BENCHMARKS:
        bench()
