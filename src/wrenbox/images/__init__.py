"""Guest images: a Debian cloud kernel, a busybox initramfs and an ext4 root with the guest agent.

Owns the image directories (``<images_dir>/<name>`` → an immutable build) and the layer cache.
``build_image(config, "minimal")`` builds or reuses one (``wrenbox.service.image_config(settings)`` is
the configuration for a data dir); ``load_image`` opens a built one. ``guest_kernel_args`` is the kernel
command line a VMM passes to boot it.
"""

from wrenbox.images.bootargs import guest_kernel_args
from wrenbox.images.builder import AGENT_PORT, BuildResult, ImageConfig, StepEvent, build_image
from wrenbox.images.manifest import Manifest
from wrenbox.images.published import Image, load_image

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
