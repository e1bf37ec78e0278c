"""Prompts the demo model is shown with (model card samples, `highspeed generate` examples, tests).

The long one is well over the model's DSA ``index_topk`` (64) so that sparse attention engages on the prompt itself,
not only deep into generation. The texts are written for this project (not taken from the corpus).
"""
from __future__ import annotations

TEXT_PROMPTS: list[str] = [
    "It was a cold evening in November, and Sherlock Holmes",
    "Prince Andrew looked at the map for a long time, and then he said",
    (
        "The regiment had marched since dawn along the frozen road. The men were hungry and tired, the horses "
        "stumbled in the snow, and the officers rode in silence at the head of the column. Towards evening they "
        "came to a small village where a few lights were burning, and the colonel ordered a halt. An old peasant "
        "came out of the nearest hut, took off his cap, and looked at the soldiers without a word. Then the "
        "colonel turned to his adjutant and"
    ),
]

CHAT_PROMPTS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Tell me about the winter in Moscow."}],
]
