from direct_rlhf.data.chat_format import Message, parse, render, split_prompt_response, truncate_at_end_of_turn


def test_multi_turn_round_trip():
    msgs = [Message("user", "Hi!"), Message("assistant", "Hello. How can I help?"),
            Message("user", "What is 2 plus 3?"), Message("assistant", "2 plus 3 is 5.")]
    text = render(msgs, add_generation_prompt=False)
    assert text == ("\n\nHuman: Hi!\n\nAssistant: Hello. How can I help?"
                    "\n\nHuman: What is 2 plus 3?\n\nAssistant: 2 plus 3 is 5.")
    assert parse(text) == msgs
    prompt, response = split_prompt_response(text)
    assert prompt == render(msgs[:3]) and response == " 2 plus 3 is 5."


def test_response_is_cut_at_the_models_own_next_turn():
    assert truncate_at_end_of_turn(" Paris.\n\nHuman: And Spain?") == (" Paris.", True)
    assert truncate_at_end_of_turn(" Paris.\n\nAssistant: x") == (" Paris.", True)
    assert truncate_at_end_of_turn(" Paris is the capital of") == (" Paris is the capital of", False)
