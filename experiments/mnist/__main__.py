from experiments.mnist.main import main

if __name__ == "__main__":
  main()
