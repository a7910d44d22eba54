# Two commands on a fresh machine. Each makes .venv ready first (tools/env.sh: torch, then the lock).
#   make demo   the toy demo: a LoRA trained on CPU, its grid and the judge's table
#   make test   the test suite (offline, CPU)
#   make canary the newest versions the bounds allow, in a fresh venv, against the fast tests
.PHONY: demo test env canary lock

env:
	@bash tools/env.sh

demo: env
	HF_HUB_OFFLINE=1 .venv/bin/python -m helpers demo

# One torch thread per process unless OMP_NUM_THREADS says otherwise, and one pytest worker per core (at most 4;
# PYTEST_WORKERS overrides): on a 2-core machine two workers of one thread each keep both cores busy without
# oversubscribing them (two threads per process on a busy machine spin: one training test went from 14 s to
# over 5 minutes). The slow tests start first (tests/conftest.py), so the workers finish together.
test: env
	@w=$${PYTEST_WORKERS:-$$(n=$$(nproc 2>/dev/null || echo 1); [ "$$n" -gt 4 ] && n=4; echo $$n)}; \
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -x -p no:cacheprovider -n $$w; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): the suite is missing or deselected" >&2; fi; \
	exit $$rc

canary:
	@bash tools/check_latest.sh

lock: env
	.venv/bin/python tools/lock.py
