"""Example BalancerPool files, shipped as package data so `balancerpool demo` works from a wheel."""
