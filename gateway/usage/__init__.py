"""Fair usage: token buckets, quotas, concurrency and bandwidth (step 8)."""
