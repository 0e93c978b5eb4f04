"""What the front ends share about listening, below the server that starts them."""


class ListenError(Exception):
    """A front end cannot listen on its address; the message says why and what to do."""
