"""Camera frames of ``POST /v1/actions``: base64 PNG/JPEG (or a data: URL) -> RGB image.

Everything that can be wrong with an image (encoding, format, size, truncation) is the
client's 413/422 naming ``image``, found here before the engine sees the request.
"""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError

from vllm_vla_pruner.api.protocol import ApiError, ServiceLimits

__all__ = ["ACCEPTED_IMAGE_FORMATS", "decode_image"]

#: PNG and JPEG only: what robot cameras send, and what the spec promises.
ACCEPTED_IMAGE_FORMATS = ("PNG", "JPEG")


def _b64_payload(data: str) -> tuple[str, str | None]:
    """Split a data: URL into (base64 payload, declared media type); plain base64 passes."""
    s = data.strip()
    if not s.startswith("data:"):
        return s, None
    head, sep, payload = s.partition(",")
    if not sep:
        raise ApiError(422, "image: data: URL has no ',' before its payload", field="image")
    params = head[len("data:") :].split(";")
    if "base64" not in params[1:]:
        raise ApiError(422, "image: data: URL must be base64-encoded (';base64,')", field="image")
    media = params[0].lower() or None
    if media is not None and media not in ("image/png", "image/jpeg", "image/jpg"):
        raise ApiError(
            422,
            f"image: media type {media!r} not accepted; send image/png or image/jpeg",
            field="image",
        )
    return payload, media


def decode_image(data: str, limits: ServiceLimits | None = None) -> Image.Image:
    """Base64 PNG/JPEG (or a data: URL) -> fully decoded RGB PIL image, or ApiError('image').

    The whole image is decoded here, not lazily in the engine, so a truncated file is the
    client's 422 instead of an engine-side failure.
    """
    limits = limits or ServiceLimits()
    payload, _ = _b64_payload(data)
    payload = "".join(payload.split())  # tolerate line-wrapped base64
    if len(payload) > (limits.max_image_bytes * 4) // 3 + 4:
        raise ApiError(
            413,
            f"image: larger than {limits.max_image_bytes} bytes decoded",
            field="image",
            type="payload_too_large",
        )
    if payload.startswith(("http://", "https://")):
        raise ApiError(422, "image: URLs are not fetched; send base64 bytes", field="image")
    try:
        padded = payload + "=" * (-len(payload) % 4)
        # Standard or URL-safe alphabet, strictly: junk characters are an error, not skipped.
        alt = b"-_" if ("-" in payload or "_" in payload) else None
        raw = base64.b64decode(padded, altchars=alt, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "image: not valid base64", field="image") from None
    if not raw:
        raise ApiError(422, "image: empty after base64 decoding", field="image")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            fmt = img.format
            if fmt not in ACCEPTED_IMAGE_FORMATS:
                raise ApiError(
                    422, f"image: format {fmt} not accepted; send PNG or JPEG", field="image"
                )
            w, h = img.size
            if w < 1 or h < 1 or w * h > limits.max_image_pixels:
                raise ApiError(
                    422,
                    f"image: {w}x{h} pixels outside 1..{limits.max_image_pixels}",
                    field="image",
                )
            img.load()
            rgb = img.convert("RGB")
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ApiError(422, "image: not a decodable PNG or JPEG image", field="image") from None
    return rgb
