"""Benchmarks: per-stage cost, Kafka/Faust baselines, end-to-end throughput and latency (`make bench`)."""
