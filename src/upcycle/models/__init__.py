"""Loading Hugging Face bases, the tiny-base pretraining recipe, checkpoint export."""
