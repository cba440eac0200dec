# The two commands of the README's quick start are `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint proto clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install-system.sh
	scripts/install-system.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The whole lifecycle through `wrenbox serve` and E2B's SDK (src/wrenbox/demo.py): the demo starts the
# server on a free loopback port and stops it afterwards (or uses the one that holds the data dir).
demo: install
	$(VENV)/bin/wrenbox demo

test: install
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

# Regenerate src/wrenbox/proto/ from proto/*.proto with protobuf-py's and connectrpc's protoc plugins
# (versions matched to the runtime libraries; the generated code is committed).
PROTO_GEN := $(VENV)/.proto-gen
proto:
	$(PY) -m pip install -q -e '.[proto]'
	rm -rf $(PROTO_GEN) && mkdir -p $(PROTO_GEN)
	$(PY) -m grpc_tools.protoc -I proto \
		--plugin=protoc-gen-py=$(VENV)/bin/protoc-gen-py --py_out=$(PROTO_GEN) \
		--plugin=protoc-gen-connectrpc=$(VENV)/bin/protoc-gen-connectrpc --connectrpc_out=$(PROTO_GEN) \
		process/process.proto filesystem/filesystem.proto
	rm -rf src/wrenbox/proto/process src/wrenbox/proto/filesystem
	cp -r $(PROTO_GEN)/process $(PROTO_GEN)/filesystem src/wrenbox/proto/
	rm -rf $(PROTO_GEN)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
