from tests.reference_messages import write

for path in write():
    print(path)
print("Written. Review every changed file (git diff tests/reference_messages) before committing.")
