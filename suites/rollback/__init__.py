"""Install, upgrade and rollback: the candidate replaces the baseline and can be rolled back, proven by digest."""
