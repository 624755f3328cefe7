# Makefile - a thin front over CMake; the real build is CMakeLists.txt.
#
#   make            install missing packages, configure and build into build/
#   make run        chatd on 127.0.0.1:6000 with a private MariaDB and Redis
#                   under var/ (contrib/run.sh; Ctrl-C stops everything)
#   make test       unit + integration tests (contrib/test.sh); with CI=true
#                   also the ASan/UBSan build and the fuzzers
#   make install    cmake --install build (PREFIX=/usr/local, DESTDIR honoured)
#   make deb        the Debian package, built in build/deb/ (prefix /usr,
#                   CHAT_DEB=ON, CPack): build/deb/package/chatd_*.deb
#   make asan       the ASan + UBSan build in build-asan/
#   make bench      contrib/bench/run-bench.sh
#   make cluster    contrib/cluster/run.sh
#   make soak       three nodes behind nginx under traffic and faults for
#                   SOAK_MINUTES (30); report in var/soak/<time>/ (SOAK_OUT)
#                   -- docs/reliability.md
#   make clean      remove the build directories (var/ data is kept)
#
# CI=true builds with -Werror (CHAT_WERROR=ON).  JOBS sets build parallelism.

SHELL := /bin/bash
BUILD ?= build
ASAN_BUILD ?= build-asan
PREFIX ?= /usr/local
JOBS ?= 2
ifeq ($(CI),true)
WERROR ?= ON
else
WERROR ?= OFF
endif

CMAKE_FLAGS = -DCHAT_WERROR=$(WERROR) -DCMAKE_INSTALL_PREFIX=$(PREFIX)

.PHONY: all deps build run test install deb asan bench cluster soak clean

all: build

deps:
	@bash contrib/deps.sh

build: deps
	cmake -S . -B $(BUILD) $(CMAKE_FLAGS)
	cmake --build $(BUILD) -j$(JOBS)

run:
	bash contrib/run.sh

test:
	bash contrib/test.sh

install: build
	cmake --install $(BUILD)

# Its own build folder under $(BUILD): the package needs prefix /usr compiled
# in (the default chat.conf path, the multiarch plugin folder), and no tests.
DEB_BUILD ?= $(BUILD)/deb
deb: deps
	cmake -S . -B $(DEB_BUILD) -DCHAT_WERROR=$(WERROR) -DCMAKE_INSTALL_PREFIX=/usr \
	    -DCHAT_DEB=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
	cmake --build $(DEB_BUILD) -j$(JOBS)
	cd $(DEB_BUILD) && cpack -G DEB
	@ls $(DEB_BUILD)/package/*.deb

asan: deps
	cmake -S . -B $(ASAN_BUILD) $(CMAKE_FLAGS) -DCHAT_ASAN=ON -DCHAT_UBSAN=ON
	cmake --build $(ASAN_BUILD) -j$(JOBS)

bench: build
	@if [ -f contrib/bench/run-bench.sh ]; then bash contrib/bench/run-bench.sh; \
	else echo "make bench: contrib/bench/run-bench.sh is not there" >&2; exit 1; fi

cluster: build
	@if [ -f contrib/cluster/run.sh ]; then bash contrib/cluster/run.sh; \
	else echo "make cluster: contrib/cluster/run.sh is not there" >&2; exit 1; fi

SOAK_MINUTES ?= 30
soak: build
	SOAK_MINUTES=$(SOAK_MINUTES) CHATD=$(CURDIR)/$(BUILD)/chatd \
	    CHAT_PLUGIN_DIR=$(CURDIR)/$(BUILD)/plugins CHAT_SRC=$(CURDIR) \
	    nice -n 10 /usr/bin/python3 tests/soak/soak.py

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) build-fuzz
