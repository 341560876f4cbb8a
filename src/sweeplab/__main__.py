from sweeplab.cli import entry_point

if __name__ == "__main__":  # not when multiprocessing's spawn re-imports the main module
    entry_point()
