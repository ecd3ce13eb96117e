"""The Fu world: a deterministic generator of 福 recognition crops.

Classes (ImageFolder order): `fu` (福 in print, brush, gold-on-red-diamond, handwritten and framed
styles), `not_fu` (look-alikes sharing 福's parts, other festive characters, plain textures, all in
the same styles so style never gives the class away) and, when `WorldConfig.merchant` is on,
`fu_merchant` (福 inside one merchant's teal/orange frame with its logo mark; `not_fu` then also
gets that frame around other characters, so the frame alone is not enough).

Every image comes from its own RNG seeded by (seed, index), so bytes do not depend on generation
order or on how many processes draw them. Train and val crops use train-split fonts only, test
crops test-split fonts only (`tasks.data.fonts.split_fonts`), so the test split measures generalisation
to unseen font designs.

Modules: `styles` (class names, styles, the sign and the glyph), `render` (one crop: background,
placement, degradations), `world` (config, plan, writing a world to disk). Import from the package.
"""

from tasks.data.fu_world.render import render_crop
from tasks.data.fu_world.styles import (
    BRAND_CREAM,
    BRAND_ORANGE,
    BRAND_TEAL,
    FU_CLASS,
    MERCHANT_CLASS,
    MERCHANT_DECOY_SHARE,
    NOT_FU_CLASS,
    OTHER_FRAME_COLOURS,
    STYLE_WEIGHTS,
)
from tasks.data.fu_world.world import (
    GENERATOR_VERSION,
    MANIFEST_COLUMNS,
    POOL_MIN_IMAGES,
    SPLITS,
    WorldConfig,
    WorldSummary,
    generate_world,
    image_rng,
    is_same_world,
    pick_face,
    plan_world,
    png_bytes,
    world_folder_name,
)

__all__ = [
    "BRAND_CREAM",
    "BRAND_ORANGE",
    "BRAND_TEAL",
    "FU_CLASS",
    "GENERATOR_VERSION",
    "MANIFEST_COLUMNS",
    "MERCHANT_CLASS",
    "MERCHANT_DECOY_SHARE",
    "NOT_FU_CLASS",
    "OTHER_FRAME_COLOURS",
    "POOL_MIN_IMAGES",
    "SPLITS",
    "STYLE_WEIGHTS",
    "WorldConfig",
    "WorldSummary",
    "generate_world",
    "image_rng",
    "is_same_world",
    "pick_face",
    "plan_world",
    "png_bytes",
    "render_crop",
    "world_folder_name",
]
