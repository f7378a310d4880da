"""General-purpose prompts that no task expert should take: the out-of-domain side of threshold calibration.

Kept apart from any evaluation set so the abstain threshold is not tuned on the prompts it is judged by.
"""

OUT_OF_DOMAIN_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Tell me a joke about cats.",
    "How do I make a good cup of coffee?",
    "Write a short poem about the sea.",
    "Who wrote Pride and Prejudice?",
    "What should I pack for a weekend camping trip?",
    "Explain why the sky is blue.",
    "Give me some tips for a job interview.",
    "How are you today?",
    "What is photosynthesis?",
    "Recommend a good science fiction book.",
    "How can I sleep better at night?",
    "What are the health benefits of walking?",
    "Describe the water cycle in simple terms.",
    "Hi there! What's up?",
    "Why do cats purr?",
    "What is the tallest mountain in the world?",
    "Suggest a name for my new puppy.",
    "How do airplanes stay in the air?",
    "Write a thank-you note to my teacher.",
    "What is the difference between weather and climate?",
    "Can you help me plan a birthday party?",
    "What are some fun things to do in the rain?",
    "Summarize the plot of Romeo and Juliet.",
    "How do I stay motivated while studying?",
    "What causes earthquakes?",
    "Tell me something interesting about octopuses.",
    "What is a healthy breakfast?",
    "How do I politely decline an invitation?",
    "Who painted the Mona Lisa?",
    "What is the meaning of life?",
    "Give me advice on learning to play the guitar.",
    "Why is exercise important?",
    "What happened during the French Revolution?",
    "Write a haiku about autumn leaves.",
    "How do vaccines work?",
    "What are black holes?",
    "How do I start a vegetable garden?",
    "Good morning! Any plans for today?",
    "What's the best way to learn a new language?",
)

# Generic follow-ups that name no task and no value: a turn close to one of these continues the conversation's
# task (router/conversation.py). Written for the purpose; none is a phrasing of the evaluation's follow-ups.
FOLLOW_UP_PHRASES: tuple[str, ...] = (
    "And this one?",
    "What about that one?",
    "Same for the next.",
    "Now the next one.",
    "And that?",
    "Do the same here.",
    "One more, please.",
    "Again, with a different one.",
    "Now this:",
    "Same thing for these.",
    "And the other one?",
    "Ok and now?",
    "Next:",
    "Also that one.",
    "Repeat for this.",
    "Can you do the same with this?",
    "Same question, different input.",
    "Likewise for this.",
    "Then this?",
    "And for the last one?",
)

# The general prompts a chat turn is compared with to tell general chat from a follow-up (router/conversation.py):
# every other calibration prompt. The rest are the general-chat turns of the dev conversations that follow-up
# test is fitted on (eval/conversations.py), so it is never fitted on prompts that find themselves here.
GENERAL_ANCHORS: tuple[str, ...] = OUT_OF_DOMAIN_PROMPTS[::2]
DEV_GENERAL_TURNS: tuple[str, ...] = OUT_OF_DOMAIN_PROMPTS[1::2]
