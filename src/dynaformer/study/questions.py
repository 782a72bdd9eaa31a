"""The study's two questions, word for word: each question's text and its five options, and the option its
author marks correct. The report opens with them; verdicts.py turns each option into a testable claim."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuestionText:
    text: str
    options: tuple[str, ...]  # options 1–5, in full
    marked: int  # the option the question's author marks correct (reported, never used to judge)


QUESTION_TEXTS: dict[str, QuestionText] = {
    "residual": QuestionText(
        "In the development of a state-of-the-art transformer-based language model for natural language understanding"
        " tasks, your team opts to implement a novel architecture that leverages the residual stream concept to "
        "enhance model performance. Considering the residual stream's role in mitigating the vanishing gradient "
        "problem and facilitating deeper network training, you propose an enhancement that involves integrating a "
        "dynamic weighting mechanism into the residual connections. This mechanism adjusts the contribution of the "
        "residual stream based on the training iteration and sequence length. Which of the following potential "
        "outcomes best aligns with the implications of this enhancement on the training and performance of the model?",
        (
            "It significantly reduces the model's ability to generalize to unseen data, leading to increased "
            "overfitting on the training dataset.",
            "It exacerbates the vanishing gradient problem, making it more challenging to train deeper network layers"
            " effectively.",
            "It improves the model’s ability to learn long-range dependencies by adaptively enhancing or attenuating "
            "the signal in the residual stream.",
            "It uniformly decreases the importance of the multi-head attention mechanism across all layers, rendering"
            " the model less capable of understanding context.",
            "It increases the computational complexity without meaningful improvement in the learning of dependencies"
            " or model performance.",
        ),
        marked=3,
    ),
    "span": QuestionText(
        "In the context of improving the performance of transformer-based large language models (LLMs), a research "
        "team proposes a novel architecture that integrates a specialized mechanism for capturing long-range "
        "dependencies more efficiently. Their approach involves modifying the multi-head self-attention mechanism to "
        "dynamically adjust the attention span based on the contextual analysis of each sequence, aiming to enhance "
        "the model's ability to understand and generate language by focusing more on relevant contextual information."
        " This method is also hypothesized to reduce computational overhead by limiting attention to the most "
        "significant parts of the input sequences. Considering the challenges and goals outlined, which of the "
        "following options best describes a potential outcome of this novel architecture, and why might it be "
        "significant?",
        (
            "Decreased perplexity on long text generation tasks, indicating improved language understanding, but "
            "increased model interpretability may be a challenge due to the dynamic nature of attention spans.",
            "Increased perplexity on long text generation tasks, as the model may struggle to maintain coherence over"
            " longer sequences, given the variability in attention span.",
            "Improved performance on downstream tasks such as question-answering and summarization, due to better "
            "representation of long-range dependencies, but potential increase in training time due to the complexity"
            " of the dynamic attention mechanism.",
            "Reduced training and inference computational costs due to the efficient attention mechanism, but "
            "potential degradation in the model's ability to capture subtle nuances in the text.",
            "No significant improvement in language understanding or computational efficiency, as the complexity of "
            "the dynamic adjustment mechanism offsets any gains from focusing attention on relevant parts of the "
            "input sequences.",
        ),
        marked=3,
    ),
}
