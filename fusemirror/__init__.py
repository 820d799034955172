"""fusemirror: remote mirroring of a block image in user space.

A FUSE filesystem presents one fixed-size image file. Every write names the extents it touches in
a write-intent journal before any image changes, then goes to the local master image and to the
slave images; after a crash only the logged extents are copied (US patent 6,671,705).
"""

__version__ = "0.1.0"
