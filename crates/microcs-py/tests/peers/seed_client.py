# The original course project's client, as its README showed it (the three lines are verbatim;
# the print is ours). Not type-checked: the project's code predates type hints.
import micro_client
client = micro_client('LIFE_GEN')
response_data = client.send_message("Give me some data back!!")
print(response_data)
