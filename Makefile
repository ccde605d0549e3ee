# The two commands the README opens with; both set the machine up first (idempotent).
SHELL := /bin/bash
VENV := .venv

.PHONY: setup demo test
setup:
	@./hw/setup.sh --quiet

demo: setup
	$(VENV)/bin/fastrelay demo

test: setup
	$(VENV)/bin/python -m pytest
