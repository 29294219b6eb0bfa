"""Benchmark peers of moeflow (llama.cpp, transformers, accelerate) on one GPU: see README.md."""
