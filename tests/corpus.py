"""A small health corpus and a query with one clearly best document, shared by the tests of several
layers that need real text to embed and rank (late interaction, the cascade, jobs, Redis security)."""

from __future__ import annotations

DOCS = {
    "aspirin": "Aspirin reduces the risk of heart attack in patients with cardiovascular disease.",
    "mito": "The mitochondria is the powerhouse of the cell and produces ATP through respiration.",
    "vitd": "Vitamin D deficiency is associated with an increased risk of bone fractures.",
    "exercise": "Regular exercise improves insulin sensitivity in adults with type 2 diabetes.",
    "smoking": "Smoking is a major risk factor for lung cancer and chronic obstructive pulmonary disease.",
    "coffee": "Coffee consumption has been linked to a lower risk of type 2 diabetes in cohort studies.",
}
QUERY = "does aspirin prevent heart attacks"  # "aspirin" answers it
