from tests.delivery.reference_messages import write

for path in write():
    print(path)
print("Written. Review every changed file (git diff tests/delivery/reference_messages) before committing.")
