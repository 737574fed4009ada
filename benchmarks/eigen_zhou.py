"""The structure of Monodepth2's Eigen-Zhou KITTI train split, embedded: which frames of which drive
are targets, on which camera (no images, no download).

Facts from ``splits/eigen_zhou/train_files.txt`` of nianticlabs/monodepth2 (39,810 lines
``<date>/<drive> <frame> <l|r>``, 32 drives): per drive its first and last target frame, and per
camera a bit per frame in that range (packed with numpy, zlib, base64). :func:`samples` gives the
(drive, frame, side) list, sorted as the KITTI converter sorts it for compact shards.
"""
from __future__ import annotations

import base64
import zlib

import numpy as np

#: (drive folder, first target frame, last target frame), in sorted order
DRIVES = [
    ("2011_09_26/2011_09_26_drive_0001_sync", 1, 106),
    ("2011_09_26/2011_09_26_drive_0005_sync", 1, 152),
    ("2011_09_26/2011_09_26_drive_0011_sync", 1, 135),
    ("2011_09_26/2011_09_26_drive_0014_sync", 1, 312),
    ("2011_09_26/2011_09_26_drive_0015_sync", 1, 295),
    ("2011_09_26/2011_09_26_drive_0017_sync", 2, 39),
    ("2011_09_26/2011_09_26_drive_0018_sync", 3, 268),
    ("2011_09_26/2011_09_26_drive_0019_sync", 1, 479),
    ("2011_09_26/2011_09_26_drive_0022_sync", 5, 798),
    ("2011_09_26/2011_09_26_drive_0028_sync", 1, 428),
    ("2011_09_26/2011_09_26_drive_0032_sync", 1, 388),
    ("2011_09_26/2011_09_26_drive_0035_sync", 1, 129),
    ("2011_09_26/2011_09_26_drive_0039_sync", 1, 393),
    ("2011_09_26/2011_09_26_drive_0051_sync", 1, 436),
    ("2011_09_26/2011_09_26_drive_0057_sync", 290, 359),
    ("2011_09_26/2011_09_26_drive_0061_sync", 1, 701),
    ("2011_09_26/2011_09_26_drive_0070_sync", 1, 418),
    ("2011_09_26/2011_09_26_drive_0079_sync", 1, 83),
    ("2011_09_26/2011_09_26_drive_0087_sync", 3, 727),
    ("2011_09_26/2011_09_26_drive_0091_sync", 1, 338),
    ("2011_09_26/2011_09_26_drive_0095_sync", 1, 266),
    ("2011_09_26/2011_09_26_drive_0104_sync", 1, 310),
    ("2011_09_26/2011_09_26_drive_0113_sync", 1, 85),
    ("2011_09_28/2011_09_28_drive_0001_sync", 15, 104),
    ("2011_09_29/2011_09_29_drive_0004_sync", 1, 324),
    ("2011_09_29/2011_09_29_drive_0026_sync", 1, 35),
    ("2011_09_30/2011_09_30_drive_0020_sync", 1, 1102),
    ("2011_09_30/2011_09_30_drive_0028_sync", 1, 5175),
    ("2011_09_30/2011_09_30_drive_0033_sync", 1, 1592),
    ("2011_09_30/2011_09_30_drive_0034_sync", 1, 1136),
    ("2011_10_03/2011_10_03_drive_0034_sync", 1, 4661),
    ("2011_10_03/2011_10_03_drive_0042_sync", 1, 1168),
]

#: per drive, then per side (l, r): one bit per frame from first to last (numpy.packbits order)
_BITS = (
    'eNpVWM/v41UV/SKJxCgJO40Yh51LFi7QKPY/kIULA4QpGzMxI9RkdCrU9s3CuNSFiWgM050TGcdGJlCg075vNEqMgZpMpEJpHzpC'
    'kdq+GTrtm/b1ves593VIbPL99vPj/br3nnvuuZXcda9OWhMRL3Iski7gO/iIq+O5ZOngT3Lw3ok1/aFzrWRcJYiPDyazymbmgpem'
    'xXjna5h0/ehjVb97W/pJnBF88OC8ZDeQKDl61/XyKh/HLCk7bGpdzGelmeRE7qQgTr59a7WyiUPEZy6Rt3YjYkX6cmEj/oZ3M4Pd'
    '+AQvk5eYtqLn72F4KyTHM0sSa7O4RuaNyPz7GLFw+qb3HNdfnjs6OvrU8e1/J47uuHXv/u5/Xj/66PMHSc7Hvjdy/A5u78WIEzf/'
    'f0Ro2Ghe6304hO8CzRrABBxtani7DXs9ph15caux97J9dMIXQzw075Q1KnseKkYr78vtT9qvk1QxRuR13DoOh624PQWDHxM57F+5'
    'meHFKN/aetlhWjUPo7jEPfdjaVt4IshM9nU8gRlpZydc3sIXyaa6RuIxOi8NZQ+XSTs3qkIHxiQ+YEl5aBiOT3HgIyJTkWf0ePD/'
    'Hs6v8GYz9p0SDMYsWFxjkyasH2S5X6QBz/R4Zuzh6xyDTwff1Z58HaiSjGXNsUQXbS3g7RxDTQR8/Izm26qJ9BkC3W1kqdlyAnya'
    '6R2cNS0s/WQtvOpklizGaixmtwcGehAbWdPjbbou+jA9trAaLL0l5mUSKtLCRc0nMVxnKBug97qErbka5K8aB7xZ47SHUEVj0lo+'
    'uYtpkF0Urjg11zkOhu8wOkvdyzm4TKanYUhEmsS6nMuyir+Pjgeqqkuaokfw8KCkhpdQHzgfLgvgcVPSTM7h3ZtNbpvNykqrbD/D'
    'ukFsiCHn+qNpicRA1iS+iOc+GmH9MPAka5r0s/2R4v3OjK/9kdx5QxFt/sS1e5vwt5WkmLKZRzGOAQU+/UPiddrdR3cOyrSPXy/T'
    'jrN6WL57rAkv5spxS8JzNs5vDvpOHdxyGFBlFjIMLm3kBYQTked5QjTgEDGZrjA2pGCki7BOkly09ON3GCHgUUHggJxbHBiKBzCz'
    '7hqSTzYxEoM6GvP0ZC+LuoFZ45RvQECrMgEQ7UkFj2QepD/dSsUh0Na8n3t+ozGoic2nJA04H38v07JRyOV2AEpxXNzIcmWOPTLQ'
    'cc0TmMgdrElIjG0GbKUdkFdOGkYBiwTWQ1ePnVqDbY7vY36/yYVxiRwNCoZkG4MVuc0mg1mhEeAeX7AszUJpUh8i2FwJ2N/4hdhF'
    'MKBiJIDypyP/tbf0V7gl2Yb89lwuYZ1mByh18MFUSIgpuUbffg5XwC/YM+VgDMFoSgJ1pF8iC6O/wa8KwN/XpZ/AuF8MxuAc01xO'
    'NMbuEmPWHNR6ixxDcC5vxyJju0Agjkn5tmSpIRMwqkm+R5QiW+QqwxPiMMNDSnt4vZJ9Mp5vT2L2G6Hrs+Zs5ViTJfImzs7aMyU3'
    'B8jk3djJa3OtZ+KbxVfmlWbbcUSdflRq2CP73sJ0MNlGjQ1kS4EHawyNuL7mGg4stpbmt8gp2AxY/kGsSE9aFRfDPzy8PAn7Gipl'
    'qQEmsxAda3SdsksqrAtIbGLHwbfgDAm7//rOIKzucf0RTd3wkN40GbrVKEiuw614ivATeHF1D0589Hj5lwmjQWDFBTnQLD/ZGaNF'
    '7wASVBQkUlrmZP8DN5+CfVsiaFbAgb2kX5iPGwJ5KYxFkwqZCVhkL5rYpKPcJ8o6afBbIq/1IN7YBcjE77PJXx4pfQoLtBa94ZMo'
    '3bDorNZdutuGh85Wmxd5zEOhwDr1r/CiLVOfa8FbEmpG4m1X3ukbP/Zuq4lPCNYxhRxq23211zSwrs8PqAUAyhX9do1JgeqTmXEw'
    'MiCCsNnJJRMzgd6ybWgumpjBlbGW7JA4W2K2kWqK9CCsx2zyEMYhdiOzYYiM8qcR4DmvLeNrzVoexavWBbqN1FvEB9Bd3di2VbqB'
    'AWMPzkiDpkoEqBzYelI0BVARas7jdPMGNNYv+1mWVkmb/vSIvC4wTXHa81rm8PwJV2BqXY48z0IeqDKqtlQ6nsCU5IW/KUR2LFOY'
    'lLSM7hKPWKk/ilJnZBKf50Ec/VnnRLigjW8+w/RqyR7YtcMWhXh8YUYuthVb35QhOBEYj+lmp65FKodDzzKfDaRFDBsIlQ58iyN/'
    'gUj3piPh6oHwCN2RpjMokDbHgZV6VLVglHls53c+1RcN5FTUgrC1gCaVgVsERhYJB0zT/mbso0ykg5SSipFf0zHJuwhp9CuqS7ss'
    'SYLcXPsLkqkjO65Ks6ePhZTmOMv9KPOIOIhEXrCdoFoCYdwjNbcsHja7WozqzCv33aVbUcowxAYn8f8K3azSrbcOLxejTrXVVTnX'
    'pJEdzlCB1ANnQW6QZViPpB/OypLTPCjYUinmHpkLpSU++8Sw7lisBAaSPMWdpsOhnXRl6Vnq4AyBN9ivZ1bOFzNdCdvL0h7BxTgk'
    'fadK9ZEG+L6+pml8hC3XDF1JUa98DKzOerrKVpkmkiqXkDc+/sWe1apUAEAXLDFt52zZtl0T36Lom+ctxHxHx1UlJChHr843RHqX'
    'qQVl52DHBPtf0qrtzdwNWcya1A0NyikJK3OmMEgygw9gZFFhDukLZL2ozm/JeV85BB+nb5SrE2NCaSKLuffJ7DaEm3NuhYgHiRt5'
    'qsww9iAIeTshHFDbVOwZmbtguioqprHksFlpnJADSyXT3kb6M5qXS/NTN7niim8iDxbUjWPbwaIPmkF8S3No7az7oswckIX7Lv4O'
    'eT7yXzMlAgxPtNXoR8ZXs5ZiNkAqMUx4D0ORYVW5+fhd9m2ponhkhKD6tKpakIh/TUZRkzcr0EJsN/AP6Z5n+uzgrH2Ld2rs68Ce'
    'BwO22A8eSPvgmHS2XLXyAiSUWrHURTyQbwYNPFVtqzhRacnZAvtIhpGp7RcdBi9sCCbojgRO7a5BDFLPLfUZ2WrmulWj+pOdYNhs'
    'DsIHXJ2hqJaDqrndMdmnlYF7Qc+5HaeG/Q0relBVw+gMZ+S0jqU8IviDewsm8nQSn3Jhq3pMwqx3+sNRUq3MWtpgnH21z+Dg6lll'
    'K+bFLe/WY3pzNmGpsSzSqmD5b9GXuTWuq5Kh/V7JpnGYoJSzSYAbbFah5g40hMZk6SbDnZZmbjHfrUpVnaRX5fQZ1LIon87Sxeo9'
    'JN4MNEnpx0qLrKzZa7J366oKdbNT3aNNNLImekrnbkW6+U3tXrh+r5JWslnYqelrnGJniYJvc2VL/YcnCxZBqbMARaYBw2UZ13oH'
    'bS078BR2rOJx2aVDLhOpdW20LnH+ZA/nvXwK+WcCbe03/n7+StD2a2/eVfiMIniMBTPJ0BLlPQVJKvoOFUshAl4iHLrFmlREy4Lr'
    'pI+kBH2OlmxjlBLfUhpoo0xPi3xntTLd2WJZWtcOjrqZHeYG9kV5k4e9+imtyHD6g8MQF7g8w8jDg4ES81BSZ9ghwuJVsqrhta1K'
    '2YaSqFkrEts83A5xMVcV+yYGBvsMOUxpFcM9EH8zpjD1gIqYJrRKUYumNpXUNRe1NUIQ0I/jXBFeaMqiIj+PBTECzi7ZFsOSyKfX'
    'GsC7AuxAtJg/SqGDPgvlDc2TlZ+Q9CNHVM3b1DRDWjbFg93J92SN3MiR/cuVWNz7OvIDQqcl1HETdBrJd8MbFAmHttnKD52WoEPB'
    'RaWuoxmyNXU2q/mCGWYnhrnoo2MqA0g32uhPolcXY3MW9ZSv0sX/1sgsXSwtbiFwQw7p0z8D5aphkioQ61NJoFt4cy1PGwQqGybx'
    '0yF7MfJNSMoS1dVUbPk5ILg4k6ctMfMCO/QuwqQtqMKlkSM5MJls/IEYM1CXlcT6eAnN4sHz0L35WoFsv/ysETI2yBvYO8EwslQR'
    'vOSQM7dbKEhiVjt5F8xMXoupTR1o2E+WBkPYONAto618VUc1KWx2T6/Hg0blmjSw15K9MP3kVG3yx7ICabnYVd4wt+Y0FTX3FQNP'
    '7rJtlT4VbU3rkDdxoqTWP9wCkIvsaXNGnEIp6RcuoJHEECxiAFnrs62wLe0Bd/DRbtpqUqGwRu9h7Q06ZM58sfOBOJjPGr26xLOm'
    'eWmQloEAQI+8+Tz3mHl3Ejv9MR7IM040TCar8JfaulI0oJI3EFRPyvFj50KdBA3Asptp8XePITKrJs8CjhsWQZBuR16UIuitqR60'
    '0GzMQn+eIbNuXuQnSVNeioES0fL8fqqDt8VZyEEPOdf80ieO7nj1xz96mAk1oViqB9mwi774U+30lzeEP5YGr+Jef7QIrFUkHqie'
    '0QfXnXRYtyE4V40ipkEHYSMXK1Ljb6IK589WgJuZHz1BdkwBDdG1p7D6nykQJe+pQ6+isemC3V/SE517WIqkQ9GUbuSqhSfc/oZc'
    'hoW7tuQxQ8meQ1SYXs7ysHfmeRxib24X+KQqH5DYs/O1RTom+fAzFWWE4Lv/A8WXW4E='
)

TRAIN_SAMPLES = 39810


def samples() -> list[tuple[str, int, str]]:
    """Every target of the split as (drive folder, frame, side), sorted by (drive, frame, side)."""
    raw = np.frombuffer(zlib.decompress(base64.b64decode("".join(_BITS))), dtype=np.uint8)
    out, at = [], 0
    for drive, lo, hi in DRIVES:
        n = hi - lo + 1
        nbytes = -(-n // 8)
        sides = {}
        for side in "lr":
            sides[side] = np.unpackbits(raw[at:at + nbytes])[:n].astype(bool)
            at += nbytes
        out += [(drive, lo + i, side) for i in range(n) for side in "lr" if sides[side][i]]
    if at != len(raw) or len(out) != TRAIN_SAMPLES:
        raise ValueError(f"embedded Eigen-Zhou structure is damaged ({len(out)} samples, {at} of {len(raw)} bytes)")
    return out
