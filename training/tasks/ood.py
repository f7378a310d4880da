"""Out-of-domain prompts: general requests no task expert should take (the right route is the base model).

They only measure routing, so the answer is "" and every prediction scores True. None of them appears in
router/calibration.py (the threshold-calibration set), so routing is not judged on the prompts it was tuned on.
The pool is small, so every split draws from all of it.
"""

from __future__ import annotations

import random

from training.tasks.base import SPLITS, Example, Item, Task

OOD_PROMPTS: tuple[str, ...] = (
    # knowledge
    "Who was the first person to walk on the moon?",
    "Why do leaves change colour in the fall?",
    "What is the largest ocean on Earth?",
    "How does a rainbow form?",
    "What did the ancient Egyptians use the pyramids for?",
    "Why is the ocean salty?",
    "How many planets are in our solar system?",
    "What is the difference between a virus and a bacterium?",
    "Who invented the telephone?",
    "How do bees make honey?",
    "What is the speed of light?",
    "Why do we have seasons?",
    "What language is spoken in Brazil?",
    "How does the internet work, in a nutshell?",
    "What is inflation in economics?",
    "Why do onions make you cry?",
    "Which is the longest river in Africa?",
    "How do magnets work?",
    "What is the greenhouse effect?",
    "What are the main causes of the First World War?",
    # advice
    "How can I save money on groceries?",
    "What is a good way to prepare for a marathon?",
    "How do I deal with a difficult coworker?",
    "Any tips for keeping houseplants alive?",
    "How should I ask my boss for a raise?",
    "What can I do to reduce stress before an exam?",
    "How do I clean a cast iron pan?",
    "What's a good routine for a productive morning?",
    "How can I make new friends after moving to a new city?",
    "Should I rent or buy a house?",
    "How do I get my toddler to eat vegetables?",
    "What are some ways to stop procrastinating?",
    "How do I choose a good laptop for university?",
    "What should I do if my car battery dies?",
    "How can I improve my public speaking?",
    # writing
    "Write a limerick about a forgetful wizard.",
    "Draft a short email inviting my team to a Friday lunch.",
    "Write an opening line for a mystery novel.",
    "Compose a birthday message for my grandmother.",
    "Write a short story about a robot who learns to paint.",
    "Give me a catchy slogan for a lemonade stand.",
    "Write a product description for a handmade wooden spoon.",
    "Help me write a cover letter for a barista job.",
    "Write a motivational quote about perseverance.",
    "Describe a sunset over the desert in three sentences.",
    "Write a toast for my best friend's wedding.",
    "Come up with a riddle about time.",
    "Write a bedtime story about a sleepy dragon.",
    "Write a two-line poem about coffee.",
    "Suggest a title for a blog post about hiking in the Alps.",
    # chit-chat
    "Hey, how's your day going?",
    "What's your favourite season and why?",
    "Do you like music?",
    "I'm bored. Any ideas?",
    "Tell me a fun fact.",
    "If you could travel anywhere, where would you go?",
    "What do you think about pineapple on pizza?",
    "Can you recommend a movie for a rainy evening?",
    "I just got a new kitten!",
    "What's the weirdest animal you know of?",
    "Do you think robots will ever dream?",
    "Good night, talk tomorrow!",
    "What's a good board game for four players?",
    "I had a long day at work.",
    "Tell me a pun about vegetables.",
    # other
    "Explain recursion to a ten-year-old.",
    "What are the pros and cons of electric cars?",
    "Compare cats and dogs as pets.",
    "What is the history of the Olympic Games?",
    "How do I write a for loop in Python?",
)


def _always_true(prediction: str, answer: str) -> bool:
    return True


def _unused_sampler(rng: random.Random) -> Item:  # generate() is overridden below
    raise NotImplementedError


class _OodTask(Task):
    def generate(self, split: str, n: int, seed: int, held_out_only: bool = False) -> list[Example]:
        """The general prompts, shuffled (`held_out_only` is accepted for the shared signature; no phrasings)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        rng = random.Random(f"{self.name}|{split}|{seed}")
        out: list[Example] = []
        while len(out) < n:  # a shuffled pass over the pool, repeated if n exceeds it
            pool = list(OOD_PROMPTS)
            rng.shuffle(pool)
            out.extend(Example(prompt=p, answer="", phrasing_id=0) for p in pool[: n - len(out)])
        return out


OOD = _OodTask(
    name="ood",
    kind="ood",
    description="Answer a general question or request (knowledge, advice, writing or chit-chat) in free form.",
    phrasings=("{prompt}",),
    sampler=_unused_sampler,
    scorer=_always_true,
    n_test_only=0,
    split_items=False,
    styles=False,
)
