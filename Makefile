# commandbus: the two commands of the README, and a few helpers.
#
#   make demo        set up everything, then run examples/quickstart.lua
#   make test        set up everything, then build and run every test (ctest)
#   make build       build the core and the Lua module for Lua 5.4 and LuaJIT
#   make bench-NAME  run bench/NAME (e.g. make bench-queue)
#   make pg-stop     stop the private PostgreSQL
#
# When DATABASE_URL is unset, a private PostgreSQL is started under .tmp/pg.

BUILD ?= build
JOBS ?= $(shell nproc)
PG_URL = $(if $(DATABASE_URL),$(DATABASE_URL),$$(scripts/pg start))

.PHONY: deps build test demo pg-stop clean

deps:
	@scripts/deps

build: deps
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

test: build
	@url=$(PG_URL) && DATABASE_URL="$$url" ctest --test-dir $(BUILD) --output-on-failure -j 2 --timeout 900

demo: build
	@url=$(PG_URL) && eval "$$(scripts/env lua5.4)" && DATABASE_URL="$$url" lua5.4 examples/quickstart.lua

bench-%: build
	@url=$(PG_URL) && eval "$$(scripts/env lua5.4)" && export DATABASE_URL="$$url" && \
	  if [ -x $(BUILD)/bench_$* ]; then $(BUILD)/bench_$*; \
	  elif [ -f bench/$*.lua ]; then lua5.4 bench/$*.lua; \
	  elif [ -x bench/$* ]; then bench/$*; \
	  else echo "no benchmark named $*" >&2; exit 2; fi

pg-stop:
	@scripts/pg stop

clean:
	rm -rf $(BUILD)
