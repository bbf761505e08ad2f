"""Rewrite a .cu file for the host emulation (emu.h): every ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
``::emu::launch(grid, block, smem, stream, kernel, args)``. Usage: transform.py IN.cu > OUT.cpp"""

import re
import sys

src = open(sys.argv[1]).read()
out, n = re.subn(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)<<<(.*?)>>>\(", r"::emu::launch(\2, \1, ", src, flags=re.S)
if n == 0:
    sys.exit(f"{sys.argv[1]}: no kernel launch found")
sys.stdout.write('#include "emu.h"\n' + out)
