"""Writes link/hot-text.ld from a text profile: the functions that ran, in
the order the linker should place them, ahead of all other code.

    python3 link/hot-text.py PROFILED PROFILE_DIR RELEASE > link/hot-text.ld

PROFILED is the instrumented regcache the profile was taken with; PROFILE_DIR
holds one file per process, written by link/profile.c: the link-time address
of every function that ran, one hex number per line. Its subdirectory tls/,
if any, holds the processes of a regcache in front of a TLS upstream: the
functions that ran only there go to a section of their own after the others
(`.text.tls`), so that the code a plain upstream never runs is packed without
joining the pages every process maps. RELEASE is the same source built as a
release: the functions that exist there are the ones to place.

Why: the kernel maps a binary's code into a process 64 KiB (fault around) or
a whole page-cache folio at a time, so functions that run, scattered among
the code that does not, kept 6.5 of the 8 MiB mapped in regcache's processes.
Placed together they take about 3.6 MiB, and the mapped code falls to ~4 MiB.
"""
import bisect
import collections
import os
import re
import subprocess
import sys

LEGACY_HASH = re.compile(r"17h[0-9a-f]{16}E")
V0_CRATE = re.compile(r"Cs[0-9A-Za-z]+_")
# The suffix link-time optimization gives a function it made local: its
# number differs from build to build.
LOCAL_SUFFIX = re.compile(r"\.\d+$")
# Crates of the standard library that only a panic's backtrace runs.
BACKTRACE = re.compile(r"gimli|addr2line|miniz_oxide|rustc_demangle|backtrace|object")


def symbols(binary):
    """(address, size, name) of the binary's functions, by address, names
    without a local suffix; and the names that had one."""
    out = subprocess.run(["nm", "-S", binary], capture_output=True, text=True, check=True).stdout
    syms, local = [], set()
    for line in out.splitlines():
        f = line.split()
        if len(f) == 4 and f[2] in "tTwW":
            name = LOCAL_SUFFIX.sub("", f[3])
            if name != f[3]:
                local.add(name)
            syms.append((int(f[0], 16), int(f[1], 16), name))
    syms.sort()
    return syms, local


def ran(syms, profile_dir):
    """name -> number of processes in which the function ran."""
    starts = [s[0] for s in syms]
    count = collections.Counter()
    for entry in os.listdir(profile_dir):
        if not os.path.isfile(os.path.join(profile_dir, entry)):
            continue
        seen = set()
        with open(os.path.join(profile_dir, entry)) as f:
            for line in f:
                if line.startswith("#"):
                    continue
                addr = int(line, 16)
                i = bisect.bisect_right(starts, addr) - 1
                if i >= 0 and syms[i][0] <= addr < syms[i][0] + max(syms[i][1], 1):
                    seen.add(syms[i][2])
        count.update(seen)
    return count


def pattern(name, unique, local):
    """The section pattern for one function, surviving a rebuild where it can.

    Legacy-mangled names end in a hash of the crate's build: a name that is
    the only one of its kind gets its hash wildcarded, so the pattern still
    matches after a toolchain or dependency change; the instances of a
    generic function differ only by hash, so theirs stay exact. v0-mangled
    names (the standard library's) spell out generic arguments; only their
    crate disambiguators are wildcarded. A local function's suffix is too.

    >>> pattern("_ZN5hyper4body5Frame4data17h0123456789abcdefE", True, False)
    '_ZN5hyper4body5Frame4data17h*E'
    >>> pattern("_ZN5hyper4body5Frame4data17h0123456789abcdefE", False, True)
    '_ZN5hyper4body5Frame4data17h0123456789abcdefE*'
    >>> pattern("_RNvNtCsgEmfK2I1SDS_4core3fmt5write", True, False)
    '_RNvNtCs*_4core3fmt5write'
    """
    if name.startswith("_R"):
        name = V0_CRATE.sub("Cs*_", name)
    elif name.startswith("_ZN") and unique:
        name = LEGACY_HASH.sub("17h*E", name)
    return name + "*" if local else name


def key(name):
    """A function's name without its build hash: all instances of a generic."""
    return LEGACY_HASH.sub("", name)


def placed(profiled, count, release, tls_count):
    """The release build's functions to place first, in order, and those to
    place after them (ran only with a TLS upstream).

    Functions that ran in the most processes come first (startup and the
    request path every process shares), then by address, which keeps callers
    beside their callees as the compiler emitted them. A function that ran
    but is missing from the release build was inlined there, or merged with
    an identical instance of the same generic (the instrumented build's
    instances all differ, so none merge): all its release instances go in.
    Then the standard library's precompiled code, which the instrumentation
    does not reach, except what only a panic's backtrace runs.
    """
    address = {n: a for a, _, n in profiled}
    by_key = collections.defaultdict(list)
    for _, _, n in release:
        by_key[key(n)].append(n)
    names = {n for _, _, n in release}

    def in_order(count):
        out = []
        for n in sorted(count, key=lambda n: (-count[n], address[n])):
            out.extend([n] if n in names else by_key[key(n)])
        return out

    hot = in_order(count)
    hot.extend(n for _, _, n in release if n.startswith("_R") and not BACKTRACE.search(n))
    hot.extend(n for _, _, n in release if n.startswith("__") and not n.startswith("__rust"))
    hot = list(dict.fromkeys(hot))
    placed_hot = set(hot)
    tls = [n for n in dict.fromkeys(in_order(tls_count)) if n not in placed_hot]
    return hot, tls, by_key


def main():
    profiled_bin, profile_dir, release_bin = sys.argv[1:4]
    profiled, _ = symbols(profiled_bin)
    count = ran(profiled, profile_dir)
    tls_dir = os.path.join(profile_dir, "tls")
    tls_count = ran(profiled, tls_dir) if os.path.isdir(tls_dir) else collections.Counter()
    release, local = symbols(release_bin)
    hot, tls, by_key = placed(profiled, count, release, tls_count)
    size = {n: s for _, s, n in release}
    print("/* Generated by scripts/order-text from a profile of bench/run; do not edit.")
    print(f"   {len(hot)} functions, {sum(size[n] for n in hot) // 1024} KiB; after them, "
          f"{len(tls)} functions, {sum(size[n] for n in tls) // 1024} KiB, that ran only with a TLS upstream.")
    print("   Functions that run go first, together: see ARCHITECTURE.md, \"Binary layout\". */")
    print("SECTIONS\n{")
    seen = set()
    for section, order in ((".text.hot", hot), (".text.tls", tls)):
        print(f"  {section} : {{")
        for p in (pattern(n, len(by_key[key(n)]) == 1, n in local) for n in order):
            # Once each, in the first section that has it. The wildcard after
            # .text. takes .text.unlikely.<name> too, where the compiler puts
            # a function it deems cold.
            if p not in seen:
                seen.add(p)
                print(f"    *(.text.*{p})")
        print("  }")
    print("}\nINSERT BEFORE .text;")


if __name__ == "__main__":
    main()
