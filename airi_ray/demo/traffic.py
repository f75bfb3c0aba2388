"""Synthetic traffic for demos, tests and benchmarks of drift detection: questions a
customer of the demo shop would ask, and sentences on unrelated subjects."""

from __future__ import annotations

import itertools

_ASK = ["How do I", "Can I", "Where can I", "Is it possible to", "What happens if I"]
_DO = [
    "reset my password",
    "return a damaged tent",
    "change the address on my order",
    "track my parcel",
    "use a gift card",
    "exchange boots for a bigger size",
    "cancel an order that has shipped",
    "get a refund for a late delivery",
    "pick up my order in store",
    "update my payment card",
]
_WHEN = ["", " today", " after thirty days", " without an account", " from abroad"]
_TOPIC = [
    "The migration of arctic terns",
    "Baroque counterpoint in the fugues of Bach",
    "Plate tectonics along the Pacific ring of fire",
    "The chemistry of sourdough fermentation",
    "Orbital resonance among the moons of Jupiter",
    "Tactics of the offside trap in football",
    "The history of Byzantine mosaics",
    "Photosynthesis in desert succulents",
    "Medieval cartography and portolan charts",
    "Quantum tunnelling in scanning microscopes",
]
_SAY = ["is a subject of study", "fascinated the old scholars", "is explained in this lecture"]

# 250 support questions and 30 sentences about something else entirely.
SUPPORT = [f"{a} {d}{w}?" for a, d, w in itertools.product(_ASK, _DO, _WHEN)]
UNRELATED = [f"{t} {s}." for t, s in itertools.product(_TOPIC, _SAY)]
