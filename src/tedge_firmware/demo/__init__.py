"""The demo: the whole stack on one machine and a firmware rollout to simulated children, with
its helper processes and its embedded broker. Used by people, tests and benchmarks only."""
