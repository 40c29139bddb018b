"""Test helpers shared by the test suite, the sample-model script and the benchmarks."""
