# The other spelling the original project allowed: `from micro_server import micro_server`.
from micro_server import micro_server


def call_back_function(message):
    return message[::-1]


server = micro_server(call_back_function, 'LIFE_GEN')
server.start_listening()
