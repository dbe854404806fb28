# The original course project's server, as its README showed it (the three lines are verbatim;
# only the callback is ours). Not type-checked: the project's code predates type hints.
import micro_server


def call_back_function(message):
    return "Here is your data, you sent: " + message


server = micro_server(call_back_function, 'LIFE_GEN')
server.start_listening()
