"""The question-only baseline picks the majority training answer per question template."""

from tinymed.data import AnswerType, MedVQASample
from tinymed.evaluate.baseline import QuestionOnlyBaseline, question_key


def _s(q, a, t="CLOSED", qt="PRES"):
    return MedVQASample(id=q + a, image="x.png", question=q, answer=a, answer_type=AnswerType(t),
                        dataset="d", split="train", question_type=qt)


def test_majority_answer_per_question_then_type_then_answer_type():
    train = [
        _s("Is there a lesion?", "yes"), _s("is there a  lesion", "yes"), _s("Is there a lesion?", "no"),
        _s("Is the mass on the left?", "no", qt="POS"), _s("Is the mass on the left?", "no", qt="POS"),
        _s("What organ is this?", "brain", "OPEN", "ORGAN"), _s("Which organ?", "chest", "OPEN", "ORGAN"),
        _s("Which organ?", "chest", "OPEN", "ORGAN"),
    ]
    baseline = QuestionOnlyBaseline(train)
    assert baseline.predict(_s("IS THERE A LESION?!", "no")) == "yes"
    assert baseline.predict(_s("Is it on the left side?", "yes", qt="POS")) == "no"  # unseen text → type
    assert baseline.predict(_s("Name the organ", "brain", "OPEN", "ORGAN")) == "chest"
    assert baseline.predict(_s("How many?", "2", "OPEN", "COUNT")) == "chest"  # unseen type → answer type
    assert question_key(" Is there\ta lesion? ") == "is there a lesion"
