"""Guest images: a Debian cloud kernel, a busybox initramfs and an ext4 root with the guest agent.

``build_image(ImageConfig.from_settings(settings), "minimal")`` builds or reuses one; ``load_image``
opens a built one. ``guest_kernel_args`` is the kernel command line a VMM passes to boot it.
"""

from wrenbox.images.bootargs import guest_kernel_args
from wrenbox.images.builder import AGENT_PORT, BuildResult, ImageConfig, StepEvent, build_image
from wrenbox.images.manifest import Manifest
from wrenbox.images.store import Image, load_image

__all__ = [
    "AGENT_PORT",
    "BuildResult",
    "Image",
    "ImageConfig",
    "Manifest",
    "StepEvent",
    "build_image",
    "guest_kernel_args",
    "load_image",
]
